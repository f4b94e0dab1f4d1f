//! The HTTP server loop: HTTP/1.1 and HTTP/2 (ALPN over TLS, or prior knowledge in clear), with
//! the connection rules of [`crate::connections`] (caps, a first-request deadline, idle and
//! stalled-write cuts, a minimum body rate), bounded header size, a cap on requests per
//! connection, HTTP/2 keep-alive pings and reset-flood limits, and a graceful drain on shutdown.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::http::{HeaderValue, Request, StatusCode, Version, header};
use axum::response::IntoResponse;
use edge_cache::BlobService;
use hyper::body::{Body as _, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use tokio::net::TcpListener;
use tower::ServiceExt;

use crate::connections::{Activity, Connections, MinRate, Tracked, Watched};

/// Connection-level limits.
#[derive(Debug, Clone)]
pub(crate) struct HttpOptions {
    pub(crate) header_read_timeout: Duration,
    pub(crate) max_header_bytes: usize,
    pub(crate) max_requests_per_connection: u64,
    pub(crate) max_concurrent_streams: u32,
    /// HTTP/2 PING interval; a peer that does not answer one within `keep_alive_timeout` is dropped.
    pub(crate) keep_alive_interval: Duration,
    pub(crate) keep_alive_timeout: Duration,
    /// HTTP/2 streams a client may reset before the server has taken them (rapid reset), and streams
    /// the server may reset for a client's protocol errors, before the connection gets a GOAWAY.
    pub(crate) max_pending_accept_reset_streams: usize,
    pub(crate) max_local_error_reset_streams: usize,
    pub(crate) tls: Option<Arc<rustls::ServerConfig>>,
    pub(crate) grace: Duration,
    /// The caps and deadlines every connection is held to, shared by the listeners that use them.
    pub(crate) connections: Arc<Connections>,
}

/// Serves `app` on `listener` until `shutdown` resolves, then lets open connections finish their
/// requests for up to `grace`.
///
/// With `blobs`, `GET`/`HEAD /b/{blob}` go straight to it rather than through `app`, which routes
/// them to the same handler: on an edge, where answering a cached blob is a few microseconds, the
/// router's layers (routing, extractors, request-id and tracing middleware) would cost as much
/// again. Such requests still get an `x-request-id` and, at `info`, the same log line.
pub(crate) async fn serve(
    listener: TcpListener,
    app: Router,
    blobs: Option<Arc<BlobService>>,
    options: HttpOptions,
    shutdown: impl Future<Output = ()>,
) {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_read_timeout)
        .max_buf_size(options.max_header_bytes.max(8192))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(options.max_concurrent_streams)
        .keep_alive_interval(options.keep_alive_interval)
        .keep_alive_timeout(options.keep_alive_timeout)
        .max_pending_accept_reset_streams(options.max_pending_accept_reset_streams)
        .max_local_error_reset_streams(options.max_local_error_reset_streams);
    let builder = Arc::new(builder);
    let acceptor = options.tls.clone().map(tokio_rustls::TlsAcceptor::from);
    // Fires at shutdown; each connection holds a receiver, so `closed()` means all have ended.
    let (drain, draining) = tokio::sync::watch::channel(());
    let request_ids = SequentialRequestId::default();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors and the like: wait a moment rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        // Over a cap, the connection is closed at once: it costs an accept, nothing more.
        let admitted = match options.connections.admit(peer) {
            Ok(admitted) => admitted,
            Err(cap) => {
                tracing::debug!(%peer, cap, "connection refused: over the cap");
                continue;
            }
        };
        let connections = options.connections.clone();
        let _ = stream.set_nodelay(true);
        let activity = Activity::new();
        // After this many HTTP/1 requests the response says `Connection: close`, so one client
        // cannot hold a connection forever.
        let max_requests = options.max_requests_per_connection;
        let served = Arc::new(AtomicU64::new(0));
        let (app, blobs, request_ids) = (app.clone(), blobs.clone(), request_ids.clone());
        let (service_activity, service_connections) = (activity.clone(), connections.clone());
        let service = hyper::service::service_fn(move |request: Request<Incoming>| {
            let in_flight = service_activity.begin();
            let n = served.fetch_add(1, Ordering::Relaxed) + 1;
            // Only what this request's path needs is cloned: each clone of a shared `Arc` is a
            // write to a cache line the other threads also write.
            let route = match &blobs {
                Some(blobs) if BlobService::serves(request.method(), request.uri().path()) => {
                    Route::Blob(blobs.clone(), request_ids.clone(), request)
                }
                _ => {
                    let limits = service_connections.limits();
                    // Who the client is, for the routes' rate limits: behind a trusted proxy, the
                    // address it forwards.
                    let client = crate::connections::client_address(peer.ip(), request.headers(), limits);
                    let (mut request, too_slow) = if limits.min_body_rate > 0 && !request.body().is_end_stream() {
                        let tripped = Arc::new(AtomicBool::new(false));
                        let (parts, body) = request.into_parts();
                        let body = MinRate::new(body, limits, tripped.clone());
                        (Request::from_parts(parts, axum::body::Body::new(body)), Some(tripped))
                    } else {
                        (request.map(axum::body::Body::new), None)
                    };
                    let client = std::net::SocketAddr::new(client, peer.port());
                    request.extensions_mut().insert(axum::extract::ConnectInfo(client));
                    Route::App(app.clone(), request, too_slow, service_connections.clone())
                }
            };
            async move {
                let http1 = matches!(route.version(), Version::HTTP_10 | Version::HTTP_11);
                let mut response = match route {
                    Route::Blob(blobs, request_ids, request) => answer_blob(&blobs, &request, &request_ids).await,
                    Route::App(app, request, too_slow, connections) => {
                        let response = app.oneshot(request).await?;
                        match too_slow {
                            Some(tripped) if tripped.load(Ordering::Acquire) => {
                                connections.count_cut("slow_body");
                                body_too_slow(connections.limits().min_body_rate)
                            }
                            _ => response,
                        }
                    }
                };
                if http1 && (n >= max_requests || response.status() == StatusCode::REQUEST_TIMEOUT) {
                    response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                Ok::<_, std::convert::Infallible>(response.map(|body| Tracked::new(body, in_flight)))
            }
        });
        let builder = builder.clone();
        let draining = draining.clone();
        let acceptor = acceptor.clone();
        let handshake_timeout = options.header_read_timeout;
        // The socket carries the connection's place under the caps: an upgraded WebSocket keeps it
        // until it closes.
        let stream = Watched::new(stream, activity.clone(), admitted);
        tokio::spawn(async move {
            let result = match acceptor {
                None => {
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                    supervise(conn, |c| c.graceful_shutdown(), &activity, &connections, draining).await
                }
                Some(acceptor) => {
                    let tls = match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(e)) => return tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => return tracing::debug!(%peer, "TLS handshake timed out"),
                    };
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), service);
                    supervise(conn, |c| c.graceful_shutdown(), &activity, &connections, draining).await
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop((listener, draining));
    let _ = drain.send(());
    if tokio::time::timeout(options.grace, drain.closed()).await.is_err() {
        tracing::warn!("connections still open after {:?}; closing them", options.grace);
    }
}

/// Where one request goes, with what it needs there.
enum Route {
    Blob(Arc<BlobService>, SequentialRequestId, Request<Incoming>),
    /// The request, and the flag its body sets when it is cut for being too slow.
    App(Router, Request<axum::body::Body>, Option<Arc<AtomicBool>>, Arc<Connections>),
}

impl Route {
    fn version(&self) -> Version {
        match self {
            Route::Blob(_, _, request) => request.version(),
            Route::App(_, request, _, _) => request.version(),
        }
    }
}

/// Runs a connection until it ends. An idle connection, or every connection once `drain` fires,
/// is asked to close gracefully (HTTP/2: GOAWAY; HTTP/1: after the current response); one that
/// has had no first request in time, or whose response the client stopped reading, is dropped.
async fn supervise<F, E>(
    conn: F,
    close: impl Fn(Pin<&mut F>),
    activity: &Activity,
    connections: &Connections,
    mut drain: tokio::sync::watch::Receiver<()>,
) -> Result<(), E>
where
    F: Future<Output = Result<(), E>>,
{
    tokio::pin!(conn);
    let mut closing = false;
    loop {
        let limits = connections.limits();
        let next = match activity.check(limits) {
            // Looked at again at least as often as the shortest rule's span: a connection that
            // goes idle or starts to stall while it waits out another deadline is still cut
            // within twice that rule's limit.
            Ok(next) => next.min(tokio::time::Instant::now() + limits.shortest()),
            Err("idle") if !closing => {
                connections.count_cut("idle");
                close(conn.as_mut());
                closing = true;
                // Closed from here on unless a request slipped in before the GOAWAY; still idle
                // after this long, it is dropped.
                tokio::time::Instant::now() + CLOSE_GRACE
            }
            Err(reason) => {
                if !closing {
                    connections.count_cut(reason);
                }
                tracing::debug!(reason, "dropping a connection");
                return Ok(());
            }
        };
        tokio::select! {
            ended = conn.as_mut() => return ended,
            _ = tokio::time::sleep_until(next) => {}
            _ = drain.changed(), if !closing => {
                close(conn.as_mut());
                closing = true;
            }
        }
    }
}

/// How long a connection asked to close gracefully while idle has to go.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// The answer to a request whose body came slower than `min_rate` bytes a second.
fn body_too_slow(min_rate: u64) -> axum::response::Response {
    let message = format!("the request body arrived slower than {min_rate} bytes a second; send it again");
    (StatusCode::REQUEST_TIMEOUT, axum::Json(types::ErrorBody::new("request_timeout", message))).into_response()
}

/// A blob request answered without the router, with what the router's layers would have added.
async fn answer_blob(
    blobs: &Arc<BlobService>,
    request: &Request<Incoming>,
    request_ids: &SequentialRequestId,
) -> axum::response::Response {
    let started = tracing::enabled!(tracing::Level::INFO).then(std::time::Instant::now);
    let mut response = blobs.answer(request.method(), request.uri(), request.headers()).await;
    let id = match request.headers().get(REQUEST_ID) {
        Some(given) => given.clone(),
        None => request_ids.next_id(),
    };
    if let Some(started) = started {
        let (method, status) = (request.method(), response.status().as_u16());
        let id = id.to_str().unwrap_or("");
        let latency_us = started.elapsed().as_micros() as u64;
        tracing::info!(id, %method, route = "/b/{blob}", status, latency_us, "finished processing request");
    }
    response.headers_mut().insert(REQUEST_ID, id);
    response
}

const REQUEST_ID: &str = "x-request-id";

/// Raises this process's soft limit on open files to its hard limit (many systems start services
/// at 1,024, which a busy server passes in connections alone) and returns the limit now in force.
pub(crate) fn raise_open_file_limit() -> u64 {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => {
            tracing::info!(limit, "open file limit");
            limit
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not raise the open file limit");
            rlimit::getrlimit(rlimit::Resource::NOFILE).map(|(soft, _)| soft).unwrap_or(1024)
        }
    }
}

/// Binds `threads` listening sockets to `addr` with SO_REUSEPORT, so the kernel spreads
/// connections over them. With port 0 the first socket picks the port and the others share it.
pub(crate) fn bind_reuseport(
    addr: std::net::SocketAddr,
    threads: usize,
) -> std::io::Result<Vec<std::net::TcpListener>> {
    let mut addr = addr;
    let mut sockets = Vec::with_capacity(threads);
    for _ in 0..threads.max(1) {
        let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(1024)?;
        let listener: std::net::TcpListener = socket.into();
        addr = listener.local_addr()?;
        sockets.push(listener);
    }
    Ok(sockets)
}

/// Serves `app` thread-per-core: one OS thread per socket, each with its own single-threaded
/// runtime accepting on its own SO_REUSEPORT socket. A connection lives on one thread from accept
/// to close, so answering a cached blob never hands work between threads (the way nginx's workers
/// run). Returns when `shutdown` resolves and every thread has drained.
pub(crate) async fn serve_per_core(
    sockets: Vec<std::net::TcpListener>,
    app: Router,
    blobs: Option<Arc<BlobService>>,
    options: HttpOptions,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut threads = Vec::new();
    for (i, socket) in sockets.into_iter().enumerate() {
        let (app, options, mut stopped) = (app.clone(), options.clone(), stopped.clone());
        // A service of its own per thread: its tiers are shared, but the `Arc` each request clones
        // is not, so threads do not contend for its count.
        let blobs = blobs.as_deref().map(|b| Arc::new(b.clone()));
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let thread = std::thread::Builder::new().name(format!("http-{i}")).spawn(move || {
            runtime.block_on(async move {
                match TcpListener::from_std(socket) {
                    Ok(listener) => {
                        serve(listener, app, blobs, options, async move {
                            let _ = stopped.wait_for(|s| *s).await;
                        })
                        .await
                    }
                    Err(e) => tracing::error!(error = %e, "could not use a listening socket"),
                }
            })
        })?;
        threads.push(thread);
    }
    shutdown.await;
    let _ = stop.send(true);
    tokio::task::spawn_blocking(move || {
        for thread in threads {
            let _ = thread.join();
        }
    })
    .await?;
    Ok(())
}

/// A rustls server config from PEM files, offering HTTP/2 and HTTP/1.1 by ALPN.
pub(crate) fn tls_config(cert: &std::path::Path, key: &std::path::Path) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    use anyhow::Context;
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing {}", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key).with_context(|| format!("reading {}", key.display()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("the TLS certificate and key do not fit together")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Request ids, one span per request and an info line per response, and a JSON 404 for unknown
/// routes: what every Courier listener has.
pub(crate) fn with_common_layers(router: Router) -> Router {
    use axum::extract::MatchedPath;
    use axum::http::StatusCode;
    use axum::response::IntoResponse;
    use tower_http::LatencyUnit;
    use tower_http::request_id::{PropagateRequestIdLayer, SetRequestIdLayer};
    use tower_http::trace::{DefaultOnFailure, DefaultOnResponse, TraceLayer};

    router
        .fallback(|| async {
            (StatusCode::NOT_FOUND, axum::Json(types::ErrorBody::new("not_found", "no such route"))).into_response()
        })
        .layer(axum::middleware::map_response(json_errors))
        .layer(
            tower::ServiceBuilder::new()
                .layer(SetRequestIdLayer::x_request_id(SequentialRequestId::default()))
                .layer(
                    TraceLayer::new_for_http()
                        .make_span_with(|request: &Request<_>| {
                            let route = request.extensions().get::<MatchedPath>().map_or("-", |p| p.as_str());
                            let id = request.headers().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or("");
                            let method = request.method();
                            tracing::info_span!("request", id, %method, route)
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
        )
}

/// Gives every error response the `{"error":{"code","message"}}` body: the router's own 405 (and
/// any other answer a layer or extractor made in plain text) keeps its status and headers (such
/// as `Allow` or `Retry-After`), and its text, if any, becomes the message.
async fn json_errors(response: axum::response::Response) -> axum::response::Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = match axum::body::to_bytes(body, 4096).await {
        Ok(bytes) => String::from_utf8_lossy(&bytes).trim().to_owned(),
        Err(_) => String::new(),
    };
    let code = match status.as_u16() {
        400 => "bad_request",
        404 => "not_found",
        405 => "method_not_allowed",
        408 => "request_timeout",
        411 => "length_required",
        413 => "too_large",
        414 => "uri_too_long",
        415 => "unsupported_media_type",
        416 => "range_not_satisfiable",
        429 => "rate_limited",
        431 => "headers_too_large",
        503 => "unavailable",
        504 => "timeout",
        500..=599 => "internal",
        _ => "invalid_request",
    };
    let message = if text.is_empty() || status.is_server_error() {
        status.canonical_reason().unwrap_or("error").to_lowercase()
    } else {
        text
    };
    let mut answer = (status, axum::Json(types::ErrorBody::new(code, message))).into_response();
    for (name, value) in parts.headers.iter() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            answer.headers_mut().insert(name.clone(), value.clone());
        }
    }
    answer
}

/// Lets the pages of `origins` call the API from a browser: preflights are answered with the
/// methods and headers the API uses, and responses expose the headers an app reads. `"*"` allows
/// any origin; credentials are never allowed (the API takes bearer tokens, not cookies). No
/// origins: no CORS headers at all.
pub(crate) fn with_cors(router: Router, origins: &[String]) -> anyhow::Result<Router> {
    use axum::http::Method;
    use tower_http::cors::{AllowOrigin, CorsLayer};
    if origins.is_empty() {
        return Ok(router);
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        let list = origins
            .iter()
            .map(|o| {
                HeaderValue::from_str(o.trim_end_matches('/')).map_err(|_| anyhow::anyhow!("allowed origin {o:?}"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        AllowOrigin::list(list)
    };
    let layer = CorsLayer::new()
        .allow_origin(allow)
        .allow_methods([Method::GET, Method::HEAD, Method::POST, Method::PUT, Method::PATCH, Method::DELETE])
        .allow_headers(
            [header::AUTHORIZATION, header::CONTENT_TYPE, header::RANGE, header::IF_NONE_MATCH]
                .into_iter()
                .chain(TUS_REQUEST_HEADERS.iter().map(|name| header::HeaderName::from_static(name)))
                .collect::<Vec<_>>(),
        )
        .expose_headers(
            [
                header::RETRY_AFTER,
                header::LOCATION,
                header::ETAG,
                header::CONTENT_RANGE,
                header::HeaderName::from_static("x-request-id"),
            ]
            .into_iter()
            .chain(TUS_RESPONSE_HEADERS.iter().map(|name| header::HeaderName::from_static(name)))
            .collect::<Vec<_>>(),
        )
        .max_age(Duration::from_secs(600));
    Ok(router.layer(layer))
}

/// What a browser's resumable-upload client (tus-js-client, Uppy) sends and must read.
const TUS_REQUEST_HEADERS: [&str; 7] = [
    "tus-resumable",
    "upload-length",
    "upload-defer-length",
    "upload-offset",
    "upload-metadata",
    "upload-checksum",
    "x-http-method-override",
];
const TUS_RESPONSE_HEADERS: [&str; 8] = [
    "tus-resumable",
    "tus-version",
    "tus-extension",
    "tus-max-size",
    "upload-offset",
    "upload-length",
    "upload-expires",
    "courier-media-status",
];

/// A `/metrics` answer: Prometheus texts joined, each without its own closing `# EOF`.
pub(crate) fn metrics_response(texts: impl IntoIterator<Item = String>) -> axum::response::Response {
    let mut body = String::new();
    for text in texts {
        body.push_str(text.strip_suffix("# EOF\n").unwrap_or(&text));
    }
    body.push_str("# EOF\n");
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], body).into_response()
}

/// `/metrics` of a node that serves blobs (origin and edge): blob serving and its connections.
pub(crate) fn metrics_route(
    blobs: Arc<BlobService>,
    connections: Arc<Connections>,
    ingest: Option<Arc<ingest::Ingest>>,
) -> Router {
    let answer = move || {
        let (blobs, connections, ingest) = (blobs.clone(), connections.clone(), ingest.clone());
        async move {
            let swept = match ingest {
                Some(ingest) => storage_metrics(&ingest).await,
                None => String::new(),
            };
            metrics_response([edge_cache::metrics_text(&blobs).await, connections.render(), swept])
        }
    };
    Router::new().route("/metrics", axum::routing::get(answer))
}

/// Prometheus text of what the blob store holds (blobs and bytes by namespace, as the tables say,
/// counted at most every [`ingest::STORED_TOTALS_EVERY`]) and what this node's sweeps of it did
/// since it started.
pub(crate) async fn storage_metrics(ingest: &ingest::Ingest) -> String {
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::family::Family;
    use prometheus_client::metrics::gauge::Gauge;
    let swept = ingest.swept();
    let mut registry = prometheus_client::registry::Registry::default();
    let by_namespace = |pairs: [(&str, u64); 2]| {
        let family = Family::<Vec<(String, String)>, Gauge<i64>>::default();
        for (namespace, value) in pairs {
            let labels = vec![("namespace".to_owned(), namespace.to_owned())];
            family.get_or_create(&labels).set(i64::try_from(value).unwrap_or(i64::MAX));
        }
        family
    };
    if let Some(totals) = ingest.stored_totals().await {
        let blobs = by_namespace([("originals", totals.originals), ("variants", totals.variants)]);
        registry.register("courier_stored_blobs", "Blobs in the blob store, by namespace", blobs);
        let bytes = by_namespace([("originals", totals.original_bytes), ("variants", totals.variant_bytes)]);
        registry.register("courier_stored_bytes", "Bytes in the blob store, by namespace", bytes);
        let pending = Gauge::<i64>::default();
        pending.set(i64::try_from(totals.pending_deletions).unwrap_or(i64::MAX));
        registry.register("courier_blob_deletions_pending", "Blobs logged for deletion, not yet deleted", pending);
    }
    let retired = Counter::<u64>::default();
    retired.inc_by(swept.originals_retired);
    registry.register("courier_sweep_originals_retired", "Originals retired after their job succeeded", retired);
    let expired = Counter::<u64>::default();
    expired.inc_by(swept.media_expired);
    registry.register("courier_sweep_media_expired", "Media that expired with their jobs", expired);
    let deleted = Family::<Vec<(String, String)>, Counter<u64>>::default();
    for (namespace, count) in [("originals", swept.originals_deleted), ("variants", swept.variants_deleted)] {
        deleted.get_or_create(&vec![("namespace".to_owned(), namespace.to_owned())]).inc_by(count);
    }
    registry.register("courier_sweep_blobs_deleted", "Blobs deleted from the blob store, by namespace", deleted);
    let mut text = String::new();
    match prometheus_client::encoding::text::encode_registry(&mut text, &registry) {
        Ok(()) => text,
        Err(_) => String::new(),
    }
}

/// Puts `metrics` (the `/metrics` route) beside `app`, or, with `metrics_listen`, on a listener
/// of its own that only it answers on (so a private network can scrape what the public cannot).
pub(crate) async fn with_metrics(
    app: Router,
    metrics: Router,
    metrics_listen: Option<std::net::SocketAddr>,
    options: &HttpOptions,
) -> anyhow::Result<Router> {
    use anyhow::Context;
    let Some(addr) = metrics_listen else { return Ok(app.merge(metrics)) };
    let socket = TcpListener::bind(addr).await.with_context(|| format!("binding {addr} for /metrics"))?;
    tracing::info!(addr = %socket.local_addr()?, "serving /metrics");
    // Caps of its own: a flood on the public listener must not refuse the scrape that shows it.
    let connections = Connections::new(options.connections.limits().clone());
    let options = HttpOptions { tls: None, connections, ..options.clone() };
    // It lives as long as the process: a scrape needs no graceful drain.
    tokio::spawn(serve(socket, with_common_layers(metrics), None, options, std::future::pending()));
    Ok(app)
}

/// Resolves on SIGINT or SIGTERM.
pub(crate) async fn shutdown_signal() {
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
    tracing::info!("shutting down: no new connections; finishing what is in flight");
}

/// Request ids that are unique per process start and cost no system call: a random prefix chosen at
/// start-up, then a counter. (A UUIDv4 per request asks the kernel for randomness every time.)
#[derive(Clone)]
struct SequentialRequestId {
    prefix: Arc<str>,
    next: Arc<AtomicU64>,
}

impl Default for SequentialRequestId {
    fn default() -> Self {
        let mut seed = [0u8; 6];
        let _ = getrandom::fill(&mut seed);
        let prefix: String = seed.iter().map(|b| format!("{b:02x}")).collect();
        Self { prefix: prefix.into(), next: Arc::new(AtomicU64::new(0)) }
    }
}

impl SequentialRequestId {
    fn next_id(&self) -> HeaderValue {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        HeaderValue::from_str(&format!("{}-{n:x}", self.prefix)).expect("hex and a dash")
    }
}

impl tower_http::request_id::MakeRequestId for SequentialRequestId {
    fn make_request_id<B>(&mut self, _: &Request<B>) -> Option<tower_http::request_id::RequestId> {
        Some(tower_http::request_id::RequestId::new(self.next_id()))
    }
}
