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
        };
        let r = &mut m.registry;
        r.register("requests", "Blob requests by response status", m.requests.clone());
        r.register("served_bytes", "Body bytes sent", m.bytes_served.clone());
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
    pub fn hit(&self, tier: &str) {
        self.hits.get_or_create(&TierLabel { tier: tier.into() }).inc();
    }

    pub fn set_tier_bytes(&self, tier: &str, bytes: u64) {
        self.tier_bytes.get_or_create(&TierLabel { tier: tier.into() }).set(bytes as i64);
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
