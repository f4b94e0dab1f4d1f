//! What a client may hold open, and for how long: caps on connections in all and per client
//! address, a deadline for a connection's first request, an idle timeout between requests, a cut
//! for a response the client stopped reading, and a minimum rate for request bodies.
//!
//! Every rule closes what a client that stops talking would otherwise hold: a descriptor, a
//! connection task, an upload slot.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use ipnet::IpNet;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// The rules, from `[http]` settings.
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    /// Open connections in all; past it a new one is closed at once.
    pub(crate) max_connections: usize,
    /// Open connections from one address (an IPv6 /64 counts as one); 0 means no cap.
    pub(crate) max_per_address: usize,
    /// Peers exempt from the per-address cap: the load balancers and proxies in front.
    pub(crate) trusted_proxies: Vec<IpNet>,
    /// Time from accept (TLS handshake included) to the first request's headers.
    pub(crate) first_request: Duration,
    /// Time with no request in flight before a kept-alive connection is closed.
    pub(crate) idle: Duration,
    /// Time a response may wait on a client that does not read it.
    pub(crate) stalled_write: Duration,
    /// Request body bytes per second a client must keep up while the server waits for them; 0: off.
    pub(crate) min_body_rate: u64,
    /// The span the body rate is measured over.
    pub(crate) body_rate_window: Duration,
}

impl Limits {
    /// Whether `ip` is one of the trusted proxies in front.
    pub(crate) fn trusts(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.trusted_proxies.iter().any(|net| net.contains(&ip))
    }

    /// The shortest span any per-connection rule waits.
    pub(crate) fn shortest(&self) -> Duration {
        self.first_request.min(self.idle).min(self.stalled_write)
    }
}

/// Why a connection was closed or refused, as a metric label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// The open connections of one listener (or several sharing limits) and their counters.
pub(crate) struct Connections {
    limits: Limits,
    open: AtomicUsize,
    per_address: Mutex<HashMap<IpAddr, u32>>,
    registry: Registry,
    open_gauge: Gauge,
    accepted: Counter,
    refused: Family<ReasonLabel, Counter>,
    closed: Family<ReasonLabel, Counter>,
}

impl std::fmt::Debug for Connections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connections").field("limits", &self.limits).field("open", &self.open).finish()
    }
}

impl Connections {
    pub(crate) fn new(limits: Limits) -> Arc<Self> {
        let mut registry = Registry::with_prefix("courier_http");
        let (open_gauge, accepted) = (Gauge::default(), Counter::default());
        let (refused, closed) = (Family::default(), Family::default());
        registry.register("connections_open", "Client connections open now", open_gauge.clone());
        registry.register("connections_accepted", "Client connections accepted", accepted.clone());
        registry.register(
            "connections_refused",
            "Connections closed at accept: over the cap in all (total) or per address (per_address)",
            refused.clone(),
        );
        registry.register(
            "connections_cut",
            "Connections the server closed: no first request in time (first_request), idle, a response \
             the client stopped reading (stalled_write), a request body below the minimum rate (slow_body)",
            closed.clone(),
        );
        Arc::new(Self {
            limits,
            open: AtomicUsize::new(0),
            per_address: Mutex::new(HashMap::new()),
            registry,
            open_gauge,
            accepted,
            refused,
            closed,
        })
    }

    pub(crate) fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Takes a place for a connection from `peer`, or says which cap it is over.
    pub(crate) fn admit(self: &Arc<Self>, peer: SocketAddr) -> Result<Admitted, &'static str> {
        if self.open.fetch_add(1, Ordering::AcqRel) >= self.limits.max_connections {
            self.open.fetch_sub(1, Ordering::AcqRel);
            self.refused.get_or_create(&ReasonLabel { reason: "total" }).inc();
            return Err("total");
        }
        let key =
            (self.limits.max_per_address > 0 && !self.limits.trusts(peer.ip())).then(|| types::client_key(peer.ip()));
        if let Some(key) = key {
            let mut counts = self.per_address.lock().unwrap_or_else(|e| e.into_inner());
            let count = counts.entry(key).or_default();
            if *count as usize >= self.limits.max_per_address {
                drop(counts);
                self.open.fetch_sub(1, Ordering::AcqRel);
                self.refused.get_or_create(&ReasonLabel { reason: "per_address" }).inc();
                return Err("per_address");
            }
            *count += 1;
        }
        self.accepted.inc();
        self.open_gauge.inc();
        Ok(Admitted { connections: self.clone(), key })
    }

    pub(crate) fn count_cut(&self, reason: &'static str) {
        self.closed.get_or_create(&ReasonLabel { reason }).inc();
    }

    /// The Prometheus text of these counters, without the closing `# EOF`.
    pub(crate) fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode_registry(&mut out, &self.registry).expect("writing to a String");
        out
    }
}

/// The client's address for a request: the peer's, or, when the peer is a trusted proxy, the
/// nearest address the proxies name that is not itself a trusted proxy (`Forwarded: for=`, else
/// `X-Forwarded-For`, read right to left). An untrusted peer's headers are ignored: anyone can
/// write them.
pub(crate) fn client_address(peer: IpAddr, headers: &axum::http::HeaderMap, limits: &Limits) -> IpAddr {
    let is_trusted = |ip: &IpAddr| limits.trusts(*ip);
    if !is_trusted(&peer) {
        return peer;
    }
    let values = |name: &str| {
        headers.get_all(name).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(',')).collect::<Vec<_>>()
    };
    let forwarded: Vec<IpAddr> = values("forwarded")
        .iter()
        .flat_map(|element| element.split(';'))
        .filter_map(|pair| {
            let (key, value) = pair.trim().split_once('=')?;
            key.eq_ignore_ascii_case("for").then(|| node_address(value)).flatten()
        })
        .collect();
    let chain = if forwarded.is_empty() {
        values("x-forwarded-for").iter().filter_map(|v| node_address(v)).collect()
    } else {
        forwarded
    };
    chain.iter().rev().find(|ip| !is_trusted(ip)).or(chain.first()).copied().unwrap_or(peer)
}

/// An address as proxies write it: `192.0.2.1`, `192.0.2.1:4711`, `"[2001:db8::1]:4711"`.
fn node_address(value: &str) -> Option<IpAddr> {
    let value = value.trim().trim_matches('"');
    if let Some(rest) = value.strip_prefix('[') {
        return rest.split(']').next()?.parse().ok();
    }
    value.parse().ok().or_else(|| value.rsplit_once(':')?.0.parse().ok())
}

/// A connection's place under the caps; given back when dropped.
pub(crate) struct Admitted {
    connections: Arc<Connections>,
    key: Option<IpAddr>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if let Some(key) = self.key {
            let mut counts = self.connections.per_address.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(count) = counts.get_mut(&key) {
                *count -= 1;
                if *count == 0 {
                    counts.remove(&key);
                }
            }
        }
        self.connections.open.fetch_sub(1, Ordering::AcqRel);
        self.connections.open_gauge.dec();
    }
}

/// What the watchdog of one connection reads: its requests and whether its writes are stuck.
/// Times are milliseconds since the connection was accepted.
pub(crate) struct Activity {
    born: Instant,
    requests: AtomicU64,
    in_flight: AtomicU32,
    last_request_end: AtomicU64,
    /// When a write last found the socket full, or `u64::MAX` while writes go through.
    write_blocked_since: AtomicU64,
    /// Response bodies that have handed the connection a frame and not been asked for the next:
    /// each waits on the client to take what it has. With one waiting, a connection that writes
    /// nothing to its socket for the stalled-write span is one whose client stopped taking its
    /// response (a reader too slow to drain even one frame, or an HTTP/2 peer withholding credit).
    /// A body waiting on its own source (an edge fill behind a range) is not counted.
    waiting_bodies: AtomicU32,
    /// When a frame was last handed over, or a write last reached the socket.
    last_progress: AtomicU64,
}

impl Activity {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            born: Instant::now(),
            requests: AtomicU64::new(0),
            in_flight: AtomicU32::new(0),
            last_request_end: AtomicU64::new(0),
            write_blocked_since: AtomicU64::new(u64::MAX),
            waiting_bodies: AtomicU32::new(0),
            last_progress: AtomicU64::new(0),
        })
    }

    fn now_ms(&self) -> u64 {
        self.born.elapsed().as_millis() as u64
    }

    /// Marks a request begun; its end is marked when the returned guard drops (with the response
    /// body, once it is sent or abandoned).
    pub(crate) fn begin(self: &Arc<Self>) -> InFlight {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    /// Why this connection should be closed now, or when to look again.
    pub(crate) fn check(&self, limits: &Limits) -> Result<Instant, &'static str> {
        let now = self.now_ms();
        let at = |ms: u64| self.born + Duration::from_millis(ms);
        let ms = |d: Duration| d.as_millis() as u64;
        if self.requests.load(Ordering::Relaxed) == 0 {
            let deadline = ms(limits.first_request);
            return if now >= deadline { Err("first_request") } else { Ok(at(deadline)) };
        }
        if self.in_flight.load(Ordering::Acquire) == 0 {
            let deadline = self.last_request_end.load(Ordering::Acquire) + ms(limits.idle);
            return if now >= deadline { Err("idle") } else { Ok(at(deadline)) };
        }
        let stalled = ms(limits.stalled_write);
        let mut next = now + stalled;
        let since = self.write_blocked_since.load(Ordering::Acquire);
        if since != u64::MAX {
            if now >= since + stalled {
                return Err("stalled_write");
            }
            next = next.min(since + stalled);
        }
        if self.waiting_bodies.load(Ordering::Acquire) > 0 {
            let since = self.last_progress.load(Ordering::Acquire);
            if now >= since + stalled {
                return Err("stalled_write");
            }
            next = next.min(since + stalled);
        }
        Ok(at(next))
    }
}

/// A request in flight on a connection.
pub(crate) struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let activity = &self.0;
        activity.last_request_end.store(activity.now_ms(), Ordering::Release);
        activity.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that holds its request's [`InFlight`] until it is sent or dropped, and tells
/// the connection's [`Activity`] while a frame it handed over waits on the client.
pub(crate) struct Tracked<B> {
    body: B,
    in_flight: InFlight,
    /// A frame was handed over and the next not asked for yet.
    handed: bool,
}

impl<B: Body> Tracked<B> {
    pub(crate) fn new(body: B, in_flight: InFlight) -> Self {
        Self { body, in_flight, handed: false }
    }

    fn set_handed(&mut self, handed: bool) {
        if self.handed == handed {
            return;
        }
        self.handed = handed;
        let activity = &self.in_flight.0;
        if handed {
            activity.last_progress.store(activity.now_ms(), Ordering::Release);
            activity.waiting_bodies.fetch_add(1, Ordering::AcqRel);
        } else {
            activity.waiting_bodies.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl<B> Drop for Tracked<B> {
    fn drop(&mut self) {
        if self.handed {
            self.in_flight.0.waiting_bodies.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        // Asked for more: what was handed over has been taken.
        self.set_handed(false);
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if let Poll::Ready(Some(Ok(_))) = &polled {
            self.set_handed(true);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A connection's socket, noting when its writes find the socket full, and holding the
/// connection's place under the caps for as long as the socket is open.
pub(crate) struct Watched<S> {
    inner: S,
    activity: Arc<Activity>,
    _admitted: Admitted,
}

impl<S> Watched<S> {
    pub(crate) fn new(inner: S, activity: Arc<Activity>, admitted: Admitted) -> Self {
        Self { inner, activity, _admitted: admitted }
    }

    fn note<T>(&self, result: &Poll<T>) {
        let blocked = &self.activity.write_blocked_since;
        match result {
            Poll::Pending => {
                if blocked.load(Ordering::Relaxed) == u64::MAX {
                    blocked.store(self.activity.now_ms(), Ordering::Release);
                }
            }
            Poll::Ready(_) => {
                if blocked.load(Ordering::Relaxed) != u64::MAX {
                    blocked.store(u64::MAX, Ordering::Release);
                }
                // Only while a body waits on the client is progress looked at.
                if self.activity.waiting_bodies.load(Ordering::Relaxed) > 0 {
                    self.activity.last_progress.store(self.activity.now_ms(), Ordering::Release);
                }
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.note(&result);
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.note(&result);
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let result = Pin::new(&mut self.inner).poll_flush(cx);
        self.note(&result);
        result
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The error a request body gives when its client sends slower than the minimum rate.
#[derive(Debug)]
pub(crate) struct BodyTooSlow;

impl std::fmt::Display for BodyTooSlow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the request body arrived slower than the server's minimum rate")
    }
}

impl std::error::Error for BodyTooSlow {}

/// A request body that fails with [`BodyTooSlow`] when fewer bytes arrive than the minimum rate
/// asks over a window of time in which the server was waiting for them. Only waiting time counts:
/// time the server spends elsewhere (hashing, storing, waiting for a slot) is never held against
/// the client, and a window runs from the server's first read, not from the request's arrival.
pub(crate) struct MinRate<B> {
    body: B,
    timer: Pin<Box<Sleep>>,
    window: Duration,
    min_bytes: u64,
    /// Bytes and waiting time in the current window.
    got: u64,
    waited: Duration,
    /// Set while the server waits on the body.
    pending_since: Option<Instant>,
    tripped: Arc<AtomicBool>,
}

impl<B> MinRate<B> {
    /// `tripped` is set when the body is cut, so the answer can be a 408.
    pub(crate) fn new(body: B, limits: &Limits, tripped: Arc<AtomicBool>) -> Self {
        let window = limits.body_rate_window;
        let min_bytes = (limits.min_body_rate as u128 * window.as_millis() / 1000) as u64;
        Self {
            body,
            timer: Box::pin(tokio::time::sleep(window)),
            window,
            min_bytes,
            got: 0,
            waited: Duration::ZERO,
            pending_since: None,
            tripped,
        }
    }
}

impl<B> Body for MinRate<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let now = Instant::now();
        if let Some(since) = this.pending_since.take() {
            this.waited += now - since;
        }
        // What has arrived is counted before the window is judged.
        match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Ready(frame) => {
                if let Some(Ok(data)) = frame.as_ref().map(|f| f.as_ref().map(Frame::data_ref)) {
                    this.got += data.map_or(0, |d| d.len() as u64);
                }
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                if this.waited >= this.window {
                    if this.got < this.min_bytes {
                        this.tripped.store(true, Ordering::Release);
                        return Poll::Ready(Some(Err(Box::new(BodyTooSlow))));
                    }
                    (this.got, this.waited) = (0, Duration::ZERO);
                }
                // Woken when the window's waiting time would run out, to judge it.
                this.pending_since = Some(now);
                this.timer.as_mut().reset(now + (this.window - this.waited));
                let _ = this.timer.as_mut().poll(cx);
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_addresses_count_by_their_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff:1:2:3".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(types::client_key(a), types::client_key(b));
        assert_ne!(types::client_key(a), types::client_key(other));
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(types::client_key(mapped), "192.0.2.7".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn the_client_is_read_from_trusted_proxies_only() {
        let secs = Duration::from_secs;
        let trusted = Limits {
            max_connections: 10,
            max_per_address: 0,
            trusted_proxies: vec!["10.0.0.0/8".parse().unwrap()],
            first_request: secs(10),
            idle: secs(60),
            stalled_write: secs(60),
            min_body_rate: 0,
            body_rate_window: secs(10),
        };
        let mut headers = axum::http::HeaderMap::new();
        headers.insert("x-forwarded-for", "198.51.100.7, 203.0.113.9, 10.1.1.1".parse().unwrap());
        let proxy: IpAddr = "10.0.0.2".parse().unwrap();
        let stranger: IpAddr = "192.0.2.50".parse().unwrap();
        // The nearest untrusted hop: what the client sent itself (198.51.100.7) could be a lie.
        assert_eq!(client_address(proxy, &headers, &trusted), "203.0.113.9".parse::<IpAddr>().unwrap());
        assert_eq!(client_address(stranger, &headers, &trusted), stranger, "an untrusted peer's header was believed");
        headers.insert("forwarded", "for=\"[2001:db8::7]:4711\";proto=https, for=10.2.2.2".parse().unwrap());
        assert_eq!(client_address(proxy, &headers, &trusted), "2001:db8::7".parse::<IpAddr>().unwrap());
        assert_eq!(client_address(proxy, &axum::http::HeaderMap::new(), &trusted), proxy);
    }
}
