//! Per-node rate limits on the unauthenticated and enumeration-prone routes.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use types::UserId;

/// The limiters, keyed by phone, client address or user.
pub(crate) struct Limits {
    pub(crate) codes_per_phone: DefaultKeyedRateLimiter<String>,
    pub(crate) codes_per_client: DefaultKeyedRateLimiter<IpAddr>,
    pub(crate) verify_per_client: DefaultKeyedRateLimiter<IpAddr>,
    pub(crate) lookups_per_user: DefaultKeyedRateLimiter<UserId>,
    /// Device links from a signed-in device: each spends a guess at the account's code, so a stolen
    /// token cannot burn the owner's sign-in codes one request after another.
    pub(crate) links_per_user: DefaultKeyedRateLimiter<UserId>,
}

fn quota(per: Duration, burst: u32) -> Quota {
    Quota::with_period(per).expect("non-zero period").allow_burst(NonZeroU32::new(burst).expect("non-zero burst"))
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            // Three codes at once, then one every two minutes.
            codes_per_phone: RateLimiter::keyed(quota(Duration::from_secs(120), 3)),
            codes_per_client: RateLimiter::keyed(quota(Duration::from_secs(10), 20)),
            verify_per_client: RateLimiter::keyed(quota(Duration::from_secs(2), 30)),
            // Contact discovery: a burst for a fresh address book, then one a second.
            lookups_per_user: RateLimiter::keyed(quota(Duration::from_secs(1), 100)),
            // Three tries, then one every ten minutes.
            links_per_user: RateLimiter::keyed(quota(Duration::from_secs(600), 3)),
        }
    }
}

impl Limits {
    /// Forgets keys whose limits have refilled, so the maps stay small.
    pub(crate) fn shrink(&self) {
        self.codes_per_phone.retain_recent();
        self.codes_per_client.retain_recent();
        self.verify_per_client.retain_recent();
        self.lookups_per_user.retain_recent();
        self.links_per_user.retain_recent();
    }
}
