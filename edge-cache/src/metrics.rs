//! Prometheus metrics of blob serving, exposed as text on `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TierLabel {
    pub tier: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    pub status: u16,
}

/// A tier that answers requests.
#[derive(Debug, Clone, Copy)]
pub enum Tier {
    Memory = 0,
    Disk = 1,
    Store = 2,
}

impl Tier {
    const ALL: [Tier; 3] = [Tier::Memory, Tier::Disk, Tier::Store];

    fn label(self) -> TierLabel {
        let tier = match self {
            Tier::Memory => "memory",
            Tier::Disk => "disk",
            Tier::Store => "store",
        };
        TierLabel { tier: tier.into() }
    }
}

/// Statuses counted without a look-up in the family (each request counts one).
const COMMON_STATUSES: [u16; 3] = [200, 206, 304];

/// Counters shared by every request of one process.
pub struct Metrics {
    registry: Registry,
    pub requests: Family<StatusLabel, Counter>,
    pub bytes_served: Counter,
    pub hits: Family<TierLabel, Counter>,
    pub misses: Counter,
    pub coalesced: Counter,
    pub upstream_requests: Counter,
    pub upstream_errors: Counter,
    pub upstream_latency: Histogram,
    pub verify_failures: Counter,
    pub evictions: Counter,
    tier_bytes: Family<TierLabel, Gauge>,
    /// The `hits` counter of each [`Tier`], and the `requests` counter of each common status,
    /// resolved once: the families take a lock and hash a label on every look-up.
    tier_hits: [Counter; 3],
    common_requests: [Counter; 3],
}

impl Default for Metrics {
    fn default() -> Self {
        let mut m = Self {
            registry: Registry::with_prefix("courier_blob"),
            requests: Default::default(),
            bytes_served: Default::default(),
            hits: Default::default(),
            misses: Default::default(),
            coalesced: Default::default(),
            upstream_requests: Default::default(),
            upstream_errors: Default::default(),
            upstream_latency: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            verify_failures: Default::default(),
            evictions: Default::default(),
            tier_bytes: Default::default(),
            tier_hits: Default::default(),
            common_requests: Default::default(),
        };
        m.tier_hits = Tier::ALL.map(|tier| m.hits.get_or_create(&tier.label()).clone());
        m.common_requests = COMMON_STATUSES.map(|status| m.requests.get_or_create(&StatusLabel { status }).clone());
        let r = &mut m.registry;
        r.register("requests", "Blob requests by response status", m.requests.clone());
        r.register("served_bytes", "Blob bytes sent in response bodies", m.bytes_served.clone());
        r.register("hits", "Requests answered from a tier", m.hits.clone());
        r.register("misses", "Requests that needed an upstream fill", m.misses.clone());
        r.register("coalesced_waiters", "Misses that joined a fill already under way", m.coalesced.clone());
        r.register("upstream_requests", "Fetches sent upstream", m.upstream_requests.clone());
        r.register("upstream_errors", "Upstream fetches that failed or timed out", m.upstream_errors.clone());
        r.register("upstream_latency_seconds", "Time to upstream response headers", m.upstream_latency.clone());
        r.register("verify_failures", "Fills whose bytes did not match their hash", m.verify_failures.clone());
        r.register("evictions", "Blobs evicted from the disk tier", m.evictions.clone());
        r.register("tier_bytes", "Bytes held per tier", m.tier_bytes.clone());
        m
    }
}

impl Metrics {
    pub fn hit(&self, tier: Tier) {
        self.tier_hits[tier as usize].inc();
    }

    /// Counts a response to a blob request.
    pub fn count_response(&self, status: u16) {
        match COMMON_STATUSES.iter().position(|&s| s == status) {
            Some(i) => self.common_requests[i].inc(),
            None => self.requests.get_or_create(&StatusLabel { status }).inc(),
        };
    }

    pub fn set_tier_bytes(&self, tier: Tier, bytes: u64) {
        self.tier_bytes.get_or_create(&tier.label()).set(bytes as i64);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String");
        out
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics(..)")
    }
}
