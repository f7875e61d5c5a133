//! Rate limits on the authorization server and the admin API.
//!
//! Client authentication costs an argon2id verification (tens of milliseconds of CPU), so the
//! OAuth endpoints are limited as a whole, and each client's credentials can be tried only so
//! often. Limits are keyed only by client ids that exist, so no request can grow the tables.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};

/// All OAuth endpoints together: 20 requests/s, bursts of 50. Bounds the CPU that argon2 can be
/// made to burn to well under one core.
pub const OAUTH_PER_SECOND: u32 = 20;
pub const OAUTH_BURST: u32 = 50;
/// One client's credentials: 60 attempts a minute, bursts of 20. Tokens live minutes, so a
/// well-behaved client needs a handful; anything more is a bug or a guess.
pub const CLIENT_AUTH_PER_MINUTE: u32 = 60;
pub const CLIENT_AUTH_BURST: u32 = 20;
/// One client's admin API calls: 50/s, bursts of 200.
pub const ADMIN_PER_SECOND: u32 = 50;
pub const ADMIN_BURST: u32 = 200;

fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).expect("rate-limit constants are non-zero")
}

pub struct Limits {
    oauth: DefaultDirectRateLimiter,
    client_auth: DefaultKeyedRateLimiter<String>,
    admin: DefaultKeyedRateLimiter<String>,
    clock: DefaultClock,
}

impl Default for Limits {
    fn default() -> Self {
        Self::new(
            Quota::per_second(nz(OAUTH_PER_SECOND)).allow_burst(nz(OAUTH_BURST)),
            Quota::per_minute(nz(CLIENT_AUTH_PER_MINUTE)).allow_burst(nz(CLIENT_AUTH_BURST)),
            Quota::per_second(nz(ADMIN_PER_SECOND)).allow_burst(nz(ADMIN_BURST)),
        )
    }
}

impl Limits {
    pub fn new(oauth: Quota, client_auth: Quota, admin: Quota) -> Self {
        Self {
            oauth: RateLimiter::direct(oauth),
            client_auth: RateLimiter::keyed(client_auth),
            admin: RateLimiter::keyed(admin),
            clock: DefaultClock::default(),
        }
    }

    /// `Err(wait)` when the OAuth endpoints are over their limit.
    pub fn oauth(&self) -> Result<(), Duration> {
        self.oauth
            .check()
            .map_err(|n| n.wait_time_from(self.clock.now()))
    }

    /// `Err(wait)` when `client_id` (an existing client) has tried its credentials too often.
    pub fn client_auth(&self, client_id: &str) -> Result<(), Duration> {
        self.client_auth
            .check_key(&client_id.to_owned())
            .map_err(|n| n.wait_time_from(self.clock.now()))
    }

    /// `Err(wait)` when `client_id` calls the admin API too often.
    pub fn admin(&self, client_id: &str) -> Result<(), Duration> {
        self.admin
            .check_key(&client_id.to_owned())
            .map_err(|n| n.wait_time_from(self.clock.now()))
    }
}

/// Seconds for a `Retry-After` header: at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    (wait.as_secs_f64().ceil() as u64).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_limit_holds_its_key_alone() {
        let one = Quota::per_minute(nz(1));
        let l = Limits::new(one, one, one);
        assert!(l.oauth().is_ok());
        assert!(l.oauth().is_err());
        assert!(l.client_auth("a").is_ok());
        assert!(l.client_auth("a").is_err());
        assert!(
            l.client_auth("b").is_ok(),
            "another client is not held back"
        );
        let wait = l.admin("a").and_then(|_| l.admin("a")).unwrap_err();
        assert!(
            wait > Duration::from_secs(50) && wait <= Duration::from_secs(60),
            "{wait:?}"
        );
        assert_eq!(retry_after_secs(Duration::from_millis(10)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1500)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(3)), 3);
    }
}
