//! Rate limits on the unauthenticated and enumeration-prone routes, kept in the database so every
//! node of a cluster counts against the same buckets (GCRA: a burst, then one more per interval;
//! see [`crate::Store::take_token`]).
//!
//! Phones are limited across codes as well as per code: a new code does not reset the count of
//! codes sent to a number or of guesses against it, so a day of re-requests buys an attacker a few
//! dozen guesses at a six-digit code, not thousands. SMS to each country calling code are capped
//! per hour (toll fraud pumps codes to premium ranges of one country).

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

/// Codes asked for by one client: 20, then one every 10 s.
pub(crate) const CODES_PER_CLIENT: Limit = Limit { bucket: "codes/client", every: Duration::from_secs(10), burst: 20 };
/// Codes sent to one phone: three, then one an hour (27 a day at most).
pub(crate) const CODES_PER_PHONE: Limit = Limit { bucket: "codes/phone", every: Duration::from_secs(3600), burst: 3 };
/// Sign-ins and refreshes by one client: 30, then one every 2 s.
pub(crate) const VERIFY_PER_CLIENT: Limit = Limit { bucket: "verify/client", every: Duration::from_secs(2), burst: 30 };
/// Guesses at one phone's codes, whichever code is pending: ten, then one an hour.
pub(crate) const GUESSES_PER_PHONE: Limit =
    Limit { bucket: "guesses/phone", every: Duration::from_secs(3600), burst: 10 };
/// Contact discovery: a burst for a fresh address book, then one a second.
pub(crate) const LOOKUPS_PER_USER: Limit = Limit { bucket: "lookups/user", every: Duration::from_secs(1), burst: 100 };
/// Device links from a signed-in device, each spending a guess at the account's code: three, then
/// one every ten minutes.
pub(crate) const LINKS_PER_USER: Limit = Limit { bucket: "links/user", every: Duration::from_secs(600), burst: 3 };

/// The hourly cap on SMS to one country calling code: the configured one for that code, else the
/// default. `None` when no SMS may go there at all.
pub(crate) fn sms_per_country(auth: &AuthConfig, calling_code: u16) -> Option<Limit> {
    let per_hour =
        auth.sms_country_limits.get(&calling_code.to_string()).copied().unwrap_or(auth.sms_per_country_per_hour);
    (per_hour > 0).then(|| Limit {
        bucket: "sms/country",
        every: Duration::from_secs(3600) / per_hour,
        burst: per_hour,
    })
}

impl Chat {
    /// Takes one request of `key` from `limit`'s bucket, or refuses with 429 and when to retry.
    pub(crate) async fn limit(&self, limit: Limit, key: &str) -> Result<(), ApiError> {
        let every_ms = limit.every.as_millis().max(1) as i64;
        match self.store.take_token(limit.bucket, key, every_ms, limit.burst.into(), now_ms()).await? {
            None => Ok(()),
            Some(wait_ms) => Err(ApiError::RateLimited { retry_after_secs: (wait_ms as u64).div_ceil(1000).max(1) }),
        }
    }

    /// Forgets link requests an hour after they expired.
    pub(crate) async fn sweep_link_requests(&self) {
        if let Err(e) = self.store.sweep_link_requests(now_ms() - 3_600_000).await {
            tracing::warn!(error = %e, "could not sweep expired link requests");
        }
    }

    /// Forgets the buckets that are full again.
    pub(crate) async fn sweep_limits(&self) {
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
        let de = sms_per_country(&auth, 49).unwrap();
        assert_eq!((de.burst, de.every), (120, Duration::from_secs(30)));
        assert!(sms_per_country(&auth, 44).is_none(), "0 sends nothing");
        assert_eq!(sms_per_country(&auth, 1).unwrap().every, Duration::from_secs(1));
    }
}
