//! Abuse limits per client address (`limits.*`, README "Security"): anonymous sign-ups, and
//! failed authentications. The counting is `governor`'s GCRA: a budget of N per minute that
//! refills one every 60/N seconds and allows bursts of N.
//!
//! Failed authentications are counted after the fact, but enforced before: once an address has
//! spent its budget, every request from it that carries credentials answers `429` (with
//! `Retry-After`) without the credential being looked at, so guessing stays at N per minute.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::config::LimitSettings;

/// Addresses remembered at most by each limiter before idle ones are forgotten.
const MAX_TRACKED: usize = 100_000;

/// A request over a limit: try again after `retry_after`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("too many requests from this address; retry in {} s", retry_after_secs(*.retry_after))]
pub struct RateLimited {
    pub retry_after: Duration,
}

impl RateLimited {
    /// `Retry-After` in whole seconds, at least 1.
    pub fn retry_after_secs(&self) -> u64 {
        retry_after_secs(self.retry_after)
    }
}

fn retry_after_secs(d: Duration) -> u64 {
    (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
}

/// The limits of one service process, shared by its handlers. Cheap to clone.
#[derive(Clone)]
pub struct Limits {
    inner: Option<Arc<Inner>>,
    trust_forwarded_for: bool,
}

struct Inner {
    registrations: DefaultKeyedRateLimiter<IpAddr>,
    auth_failures: DefaultKeyedRateLimiter<IpAddr>,
    /// Addresses that spent their failure budget, until when.
    blocked: Mutex<HashMap<IpAddr, Instant>>,
}

impl Limits {
    /// Limits as configured; with `limits.enabled = false` every check passes.
    pub fn new(settings: &LimitSettings) -> Self {
        let per_minute = |n: u32| Quota::per_minute(NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN));
        let inner = settings.enabled.then(|| {
            Arc::new(Inner {
                registrations: RateLimiter::keyed(per_minute(settings.registrations_per_minute)),
                auth_failures: RateLimiter::keyed(per_minute(settings.auth_failures_per_minute)),
                blocked: Mutex::new(HashMap::new()),
            })
        });
        Limits {
            inner,
            trust_forwarded_for: settings.trust_forwarded_for,
        }
    }

    /// No limits at all.
    pub fn disabled() -> Self {
        Limits {
            inner: None,
            trust_forwarded_for: false,
        }
    }

    /// The client's address: the TCP peer, or the first `X-Forwarded-For` entry when
    /// `limits.trust_forwarded_for` is set and the header is well-formed.
    pub fn client_ip(&self, peer: Option<SocketAddr>, headers: &HeaderMap) -> Option<IpAddr> {
        if self.trust_forwarded_for {
            let forwarded = headers
                .get("x-forwarded-for")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.split(',').next())
                .and_then(|v| v.trim().parse().ok());
            if forwarded.is_some() {
                return forwarded;
            }
        }
        peer.map(|p| p.ip())
    }

    /// Counts one anonymous sign-up from `ip`.
    ///
    /// # Errors
    /// [`RateLimited`] when the address is over `limits.registrations_per_minute`.
    pub fn check_registration(&self, ip: Option<IpAddr>) -> Result<(), RateLimited> {
        let (Some(inner), Some(ip)) = (&self.inner, ip) else {
            return Ok(());
        };
        forget_idle(&inner.registrations);
        inner
            .registrations
            .check_key(&ip)
            .map_err(|not_until| RateLimited {
                retry_after: not_until.wait_time_from(DefaultClock::default().now()),
            })
    }

    /// Whether `ip` may present credentials now.
    ///
    /// # Errors
    /// [`RateLimited`] while the address is over `limits.auth_failures_per_minute`.
    pub fn check_auth_allowed(&self, ip: Option<IpAddr>) -> Result<(), RateLimited> {
        let (Some(inner), Some(ip)) = (&self.inner, ip) else {
            return Ok(());
        };
        let blocked = inner
            .blocked
            .lock()
            .expect("never poisoned: no panics while held");
        match blocked.get(&ip) {
            Some(until) if *until > Instant::now() => Err(RateLimited {
                retry_after: *until - Instant::now(),
            }),
            _ => Ok(()),
        }
    }

    /// Counts one failed authentication from `ip`; once the budget is spent, the address is
    /// refused ([`Limits::check_auth_allowed`]) until it refills.
    pub fn record_auth_failure(&self, ip: Option<IpAddr>) {
        let (Some(inner), Some(ip)) = (&self.inner, ip) else {
            return;
        };
        forget_idle(&inner.auth_failures);
        if let Err(not_until) = inner.auth_failures.check_key(&ip) {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            let mut blocked = inner
                .blocked
                .lock()
                .expect("never poisoned: no panics while held");
            if blocked.len() >= MAX_TRACKED {
                let now = Instant::now();
                blocked.retain(|_, until| *until > now);
            }
            blocked.insert(ip, Instant::now() + wait);
            metrics::counter!("upline_auth_rate_limited_total").increment(1);
        }
    }
}

/// Keeps a keyed limiter's memory bounded: forgets addresses whose budget is full again.
fn forget_idle(limiter: &DefaultKeyedRateLimiter<IpAddr>) {
    if limiter.len() >= MAX_TRACKED {
        limiter.retain_recent();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(registrations: u32, failures: u32) -> Limits {
        Limits::new(&LimitSettings {
            enabled: true,
            registrations_per_minute: registrations,
            auth_failures_per_minute: failures,
            trust_forwarded_for: false,
        })
    }

    #[test]
    fn sign_ups_past_the_budget_are_refused_with_a_wait_per_address() {
        let l = limits(3, 10);
        let a = Some(IpAddr::from([10, 0, 0, 1]));
        let b = Some(IpAddr::from([10, 0, 0, 2]));
        for _ in 0..3 {
            assert!(l.check_registration(a).is_ok());
        }
        let refused = l.check_registration(a).expect_err("fourth in a minute");
        assert!(refused.retry_after_secs() >= 1 && refused.retry_after_secs() <= 20);
        assert!(
            l.check_registration(b).is_ok(),
            "another address is unaffected"
        );
    }

    #[test]
    fn after_the_failure_budget_every_credential_from_the_address_waits() {
        let l = limits(3, 2);
        let a = Some(IpAddr::from([10, 0, 0, 1]));
        assert!(l.check_auth_allowed(a).is_ok());
        l.record_auth_failure(a);
        l.record_auth_failure(a);
        assert!(
            l.check_auth_allowed(a).is_ok(),
            "two failures are within budget"
        );
        l.record_auth_failure(a);
        assert!(l.check_auth_allowed(a).is_err());
        assert!(l
            .check_auth_allowed(Some(IpAddr::from([10, 0, 0, 2])))
            .is_ok());
    }

    #[test]
    fn disabled_limits_never_refuse() {
        let l = Limits::disabled();
        let a = Some(IpAddr::from([10, 0, 0, 1]));
        for _ in 0..100 {
            assert!(l.check_registration(a).is_ok());
            l.record_auth_failure(a);
        }
        assert!(l.check_auth_allowed(a).is_ok());
    }

    #[test]
    fn the_forwarded_address_is_used_only_when_trusted() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-forwarded-for",
            "203.0.113.7, 10.0.0.1".parse().expect("header"),
        );
        let peer = Some(SocketAddr::from(([127, 0, 0, 1], 4000)));
        let untrusted = limits(1, 1);
        assert_eq!(
            untrusted.client_ip(peer, &headers),
            Some(IpAddr::from([127, 0, 0, 1]))
        );
        let trusted = Limits {
            trust_forwarded_for: true,
            ..untrusted
        };
        assert_eq!(
            trusted.client_ip(peer, &headers),
            Some(IpAddr::from([203, 0, 113, 7]))
        );
    }
}
