//! Rate limits on the unauthenticated and enumeration-prone routes, kept in the database so every
//! node of a cluster counts against the same buckets (GCRA: a burst, then one more per interval;
//! see [`crate::Store::take_token`]).
//!
//! Phones are limited across codes as well as per code: a new code does not reset the count of
//! codes sent to a number or of guesses against it, so a day of re-requests buys an attacker a few
//! dozen guesses at a six-digit code, not thousands. SMS to each country are capped per hour (toll
//! fraud pumps codes to premium ranges of one country). In front of the database, each node sheds
//! floods from one client in memory (`Chat::shed`) before they cost a write.

use std::time::Duration;

use crate::chat::{Chat, now_ms};
use crate::config::AuthConfig;
use crate::error::ApiError;

/// A bucket: `burst` requests at once, then one more every `every`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limit {
    pub(crate) bucket: &'static str,
    pub(crate) every: Duration,
    pub(crate) burst: u32,
}

impl Limit {
    /// The interval, in the store's unit (at least 1 ms).
    fn every_ms(&self) -> i64 {
        self.every.as_millis().max(1) as i64
    }
}

/// Let through (no wait), or 429 with the wait rounded up to whole seconds for `Retry-After`.
fn refused_for(wait_ms: Option<i64>) -> Result<(), ApiError> {
    match wait_ms {
        None => Ok(()),
        Some(wait_ms) => Err(ApiError::RateLimited { retry_after_secs: (wait_ms as u64).div_ceil(1000).max(1) }),
    }
}

/// Codes asked for by one client: 20, then one every 10 s.
pub(crate) const CODES_PER_CLIENT: Limit = Limit { bucket: "codes/client", every: Duration::from_secs(10), burst: 20 };
/// Codes sent to one phone: three, then one an hour (27 a day at most).
pub(crate) const CODES_PER_PHONE: Limit = Limit { bucket: "codes/phone", every: Duration::from_secs(3600), burst: 3 };
/// Sign-ins by one client: 30, then one every 2 s.
pub(crate) const VERIFY_PER_CLIENT: Limit = Limit { bucket: "verify/client", every: Duration::from_secs(2), burst: 30 };
/// Token refreshes by one client: looser than sign-ins, as thousands of devices behind one
/// carrier-grade NAT refresh every hour (and a refresh token is not guessable): 200, then 20 a
/// second.
pub(crate) const REFRESH_PER_CLIENT: Limit =
    Limit { bucket: "refresh/client", every: Duration::from_millis(50), burst: 200 };
/// Wrong guesses at one phone's codes, whichever code is pending: ten, then one an hour. Only a
/// wrong guess at a pending code counts, so nobody spends a phone's guesses without a code the
/// phone asked for.
pub(crate) const GUESSES_PER_PHONE: Limit =
    Limit { bucket: "guesses/phone", every: Duration::from_secs(3600), burst: 10 };
/// Contact-list changes by one user: 20, then one a minute (a list is up to 5,000 users).
pub(crate) const CONTACT_CHANGES_PER_USER: Limit =
    Limit { bucket: "contacts/user", every: Duration::from_secs(60), burst: 20 };
/// Contact discovery: a burst for a fresh address book, then one a second.
pub(crate) const LOOKUPS_PER_USER: Limit = Limit { bucket: "lookups/user", every: Duration::from_secs(1), burst: 100 };
/// Batched contact discovery: ten batches of up to 1,000 numbers, then one every 2.4 hours (about
/// 10,000 numbers a day at most): enough for an address book, too few to walk a numbering plan.
pub(crate) const DISCOVERIES_PER_USER: Limit =
    Limit { bucket: "discover/user", every: Duration::from_secs(8640), burst: 10 };
/// Profile changes by one user: 20, then one a minute (each is announced to up to 5,000 users).
pub(crate) const PROFILE_CHANGES_PER_USER: Limit =
    Limit { bucket: "profile/user", every: Duration::from_secs(60), burst: 20 };
/// Profile reads by one user (`GET /v1/users/{id}`, and batches of up to 256): 100, then one a
/// second.
pub(crate) const PROFILE_READS_PER_USER: Limit =
    Limit { bucket: "profiles/user", every: Duration::from_secs(1), burst: 100 };
/// Device links from a signed-in device, each spending a guess at the account's code: three, then
/// one every ten minutes.
pub(crate) const LINKS_PER_USER: Limit = Limit { bucket: "links/user", every: Duration::from_secs(600), burst: 3 };

/// Where a phone number is, for the per-country SMS cap: its region (ISO 3166 code, e.g. "JM"
/// for a Jamaican number inside +1) where libphonenumber knows it, else its calling code ("881").
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Country {
    pub(crate) calling_code: u16,
    pub(crate) region: Option<String>,
}

impl Country {
    /// The bucket's key.
    pub(crate) fn key(&self) -> String {
        self.region.clone().unwrap_or_else(|| self.calling_code.to_string())
    }
}

/// The hourly cap on SMS to one country: the configured one for its region, else for its calling
/// code, else the default. `None` when no SMS may go there at all.
pub(crate) fn sms_per_country(auth: &AuthConfig, country: &Country) -> Option<Limit> {
    let configured = |key: &str| auth.sms_country_limits.get(key).copied();
    let per_hour = country
        .region
        .as_deref()
        .and_then(configured)
        .or_else(|| configured(&country.calling_code.to_string()))
        .unwrap_or(auth.sms_per_country_per_hour);
    (per_hour > 0).then(|| Limit {
        bucket: "sms/country",
        every: Duration::from_secs(3600) / per_hour,
        burst: per_hour,
    })
}

/// The hourly cap on SMS to a whole calling code, when the operator set one for it and the number's
/// region has a bucket of its own: one cap for "+1" holds across every NANP region.
pub(crate) fn sms_per_calling_code(auth: &AuthConfig, country: &Country) -> Option<(Limit, String)> {
    country.region.as_ref()?;
    let code = country.calling_code.to_string();
    let per_hour = *auth.sms_country_limits.get(&code)?;
    let limit =
        Limit { bucket: "sms/code", every: Duration::from_secs(3600) / per_hour.max(1), burst: per_hour.max(1) };
    Some((limit, code))
}

impl Chat {
    /// Takes one request of `key` from `limit`'s bucket, or refuses with 429 and when to retry.
    pub(crate) async fn limit(&self, limit: Limit, key: &str) -> Result<(), ApiError> {
        let wait = self.store.take_token(limit.bucket, key, limit.every_ms(), limit.burst.into(), now_ms()).await?;
        refused_for(wait)
    }

    /// Sheds a flood from one client on this node, before it costs a database write.
    pub(crate) fn shed(&self, client: std::net::IpAddr) -> Result<(), ApiError> {
        self.shed.check_key(&client).map_err(|_| ApiError::RateLimited { retry_after_secs: 1 })
    }

    /// Whether `limit` would let a request of `key` through now, taking nothing.
    pub(crate) async fn peek_limit(&self, limit: Limit, key: &str) -> Result<(), ApiError> {
        let wait = self.store.peek_token(limit.bucket, key, limit.every_ms(), limit.burst.into(), now_ms()).await?;
        refused_for(wait)
    }

    /// Returns the token a request took from `limit` when it did not go ahead after all.
    pub(crate) async fn give_back(&self, limit: Limit, key: &str) {
        if let Err(e) = self.store.give_back(limit.bucket, key, limit.every_ms()).await {
            tracing::warn!(error = %e, bucket = limit.bucket, "could not give a rate-limit token back");
        }
    }

    /// Forgets link requests an hour after they expired.
    pub(crate) async fn sweep_link_requests(&self) {
        if let Err(e) = self.store.sweep_link_requests(now_ms() - 3_600_000).await {
            tracing::warn!(error = %e, "could not sweep expired link requests");
        }
    }

    /// Forgets the buckets that are full again, in the database and in memory.
    pub(crate) async fn sweep_limits(&self) {
        self.shed.retain_recent();
        match self.store.sweep_limits(now_ms()).await {
            Ok(swept) => tracing::debug!(swept, "swept full rate-limit buckets"),
            Err(e) => tracing::warn!(error = %e, "could not sweep rate-limit buckets"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn countries_take_their_own_cap_or_the_default() {
        let mut auth = AuthConfig { sms_per_country_per_hour: 120, ..AuthConfig::default() };
        auth.sms_country_limits.insert("44".into(), 0);
        auth.sms_country_limits.insert("1".into(), 3600);
        auth.sms_country_limits.insert("JM".into(), 10);
        let at = |code: u16, region: &str| Country { calling_code: code, region: Some(region.into()) };
        let de = sms_per_country(&auth, &at(49, "DE")).unwrap();
        assert_eq!((de.burst, de.every), (120, Duration::from_secs(30)));
        assert!(sms_per_country(&auth, &at(44, "GB")).is_none(), "0 sends nothing");
        assert_eq!(sms_per_country(&auth, &at(1, "US")).unwrap().every, Duration::from_secs(1));
        assert_eq!(sms_per_country(&auth, &at(1, "JM")).unwrap().burst, 10, "a region's own cap first");
        assert_eq!(at(1, "JM").key(), "JM");
        assert_eq!(Country { calling_code: 881, region: None }.key(), "881");
    }
}
