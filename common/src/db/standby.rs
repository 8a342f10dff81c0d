//! Report reads from a hot standby (`database.standby_reads`; docs/operations.md, "Report
//! reads from the standby").
//!
//! The api serves a user's earnings, referrals and history and the leaderboard from a host of
//! `database.url` that is in recovery, while that host is at most
//! `database.standby_max_lag_secs` behind the primary; otherwise, and whenever the standby
//! cannot be reached, from the primary. Everything else (writes, purchases, sign-ups, tokens)
//! always goes to the primary.
//!
//! **How the lag is measured.** Every second a task asks the primary for its WAL insert
//! position (`pg_current_wal_insert_lsn()`) and keeps these samples with the time it took
//! them; it asks the standby how far it has replayed (`pg_last_wal_replay_lsn()`). Everything
//! committed on the primary before a sample was taken lies at or below that sample's position,
//! so once the standby has replayed past it, the standby shows every commit up to that time.
//! The lag is the age of the newest sample the standby has replayed. It is an upper bound and
//! does not grow while both servers are idle (the position does not move), unlike
//! `now() - pg_last_xact_replay_timestamp()`. Between two checks the lag may grow by the check
//! interval, so a report read from the standby is at most `standby_max_lag_secs` + 1 s old.

use std::collections::VecDeque;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::postgres::PgConnectOptions;
use sqlx::PgPool;

use super::{in_recovery, pool_options, Checkout, Hosts, Moved, FOLLOW_EVERY};
use crate::config::DatabaseSettings;

/// How long one check's query may take before the standby is treated as unreachable.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// Where the api's report reads go: the standby while it is fresh enough, otherwise the
/// primary. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ReportReads {
    primary: PgPool,
    standby: Option<Arc<Standby>>,
}

#[derive(Debug)]
struct Standby {
    pool: PgPool,
    /// In recovery and at most `standby_max_lag_secs` behind, at the last check.
    fresh: AtomicBool,
}

impl ReportReads {
    /// Every read on `primary` (`database.standby_reads = false`).
    pub fn primary_only(primary: PgPool) -> ReportReads {
        ReportReads {
            primary,
            standby: None,
        }
    }

    /// With `settings.standby_reads`, a pool over a standby among the hosts of `settings.url`
    /// and a task that finds that standby (again after a failover), measures its lag every
    /// second, and ends with `primary`; without it, [`ReportReads::primary_only`]. Until the
    /// first check finds a fresh standby, reads go to the primary.
    ///
    /// # Errors
    /// `settings.url` is not a URL.
    pub fn start(primary: PgPool, settings: &DatabaseSettings) -> anyhow::Result<ReportReads> {
        if !settings.standby_reads {
            return Ok(ReportReads::primary_only(primary));
        }
        let hosts = Hosts::parse(&settings.url)?;
        let moved_at = Moved::default();
        // Lazily, at the first host: the task points it at the standby it finds.
        let options = PgConnectOptions::from_str(&hosts.urls[0])?;
        let standby = Arc::new(Standby {
            pool: pool_options(settings, &moved_at, Checkout::Ping).connect_lazy_with(options),
            fresh: AtomicBool::new(false),
        });
        let max_lag = Duration::from_secs(settings.standby_max_lag_secs);
        tokio::spawn(watch(
            primary.clone(),
            standby.clone(),
            hosts,
            max_lag,
            moved_at,
        ));
        Ok(ReportReads {
            primary,
            standby: Some(standby),
        })
    }

    /// The pool a report read uses now: the standby's when, at the last check, it was in
    /// recovery and at most `standby_max_lag_secs` behind; the primary's otherwise.
    pub fn pool(&self) -> &PgPool {
        match &self.standby {
            Some(s) if s.fresh.load(Ordering::Relaxed) => &s.pool,
            _ => &self.primary,
        }
    }

    /// The primary's pool: for a read that must see the latest commit (a user the standby
    /// does not know yet may have just signed up).
    pub fn primary(&self) -> &PgPool {
        &self.primary
    }

    /// Whether `pool` (one [`ReportReads::pool`] returned) is the standby's.
    pub fn is_standby(&self, pool: &PgPool) -> bool {
        !std::ptr::eq(pool, &self.primary)
    }

    /// A read on the standby failed: send reads to the primary until the next check finds
    /// the standby fresh again (at most a second).
    pub fn standby_failed(&self) {
        if let Some(s) = &self.standby {
            if s.fresh.swap(false, Ordering::Relaxed) {
                tracing::warn!("a report read on the standby failed; report reads go to the primary until it answers");
            }
        }
    }
}

/// A WAL position (`pg_lsn`, written `16/B374D848`) as a number.
fn parse_lsn(text: &str) -> Option<u64> {
    let (high, low) = text.split_once('/')?;
    Some((u64::from_str_radix(high, 16).ok()? << 32) | u64::from_str_radix(low, 16).ok()?)
}

/// Samples of the primary's WAL insert position, oldest first, and what they say about a
/// standby's replay position.
#[derive(Debug, Default)]
struct Samples(VecDeque<(Instant, u64)>);

impl Samples {
    /// The lag of a standby that has replayed up to `replayed`: the age at `now` of the newest
    /// sample at or below it; without one, at least the age of the oldest sample kept.
    fn lag(&self, replayed: u64, now: Instant) -> Duration {
        self.0
            .iter()
            .rev()
            .find(|(_, lsn)| *lsn <= replayed)
            .or(self.0.front())
            .map_or(Duration::MAX, |(at, _)| now.saturating_duration_since(*at))
    }

    /// Records a sample and forgets those older than `keep`, keeping the newest of them (a
    /// standby that replayed only that far is still known to be at least that far behind).
    fn push(&mut self, at: Instant, lsn: u64, keep: Duration) {
        self.0.push_back((at, lsn));
        while self.0.len() > 1 && self.0[1].0 + keep < at {
            self.0.pop_front();
        }
    }
}

/// The standby's state at one check.
enum Check {
    /// In recovery, replayed up to this position (`None`: nothing replayed yet).
    Standby(Option<u64>),
    /// Answered, but is not in recovery: promoted, a primary now.
    Promoted,
}

async fn check(pool: &PgPool) -> anyhow::Result<Check> {
    let (recovering, replayed): (bool, Option<String>) = tokio::time::timeout(
        CHECK_TIMEOUT,
        sqlx::query_as("select pg_is_in_recovery(), pg_last_wal_replay_lsn()::text")
            .fetch_one(pool),
    )
    .await??;
    Ok(if recovering {
        Check::Standby(replayed.as_deref().and_then(parse_lsn))
    } else {
        Check::Promoted
    })
}

/// Every second: samples the primary's WAL position, checks the standby (finding one among
/// `hosts` when there is none), and marks it fresh when its lag is at most `max_lag`. Sets the
/// gauges `upline_standby_lag_seconds` and `upline_report_reads_on_standby` (1 or 0).
async fn watch(
    primary: PgPool,
    standby: Arc<Standby>,
    hosts: Hosts,
    max_lag: Duration,
    moved_at: Moved,
) {
    let mut samples = Samples::default();
    let mut current: Option<String> = None;
    let keep = max_lag + 2 * FOLLOW_EVERY;
    while !primary.is_closed() {
        let position = tokio::time::timeout(
            CHECK_TIMEOUT,
            sqlx::query_scalar::<_, String>("select pg_current_wal_insert_lsn()::text")
                .fetch_one(&primary),
        )
        .await;
        if let Ok(Ok(Some(lsn))) = position.map(|r| r.map(|t| parse_lsn(&t))) {
            samples.push(Instant::now(), lsn, keep);
        }
        if current.is_none() {
            current = find_standby(&hosts, &standby.pool, &moved_at).await;
        }
        let lag = match &current {
            None => None,
            Some(host) => match check(&standby.pool).await {
                Ok(Check::Standby(Some(replayed))) => Some(samples.lag(replayed, Instant::now())),
                Ok(Check::Standby(None)) => None,
                Ok(Check::Promoted) => {
                    tracing::warn!(%host, "the standby of report reads was promoted; looking for another standby");
                    current = None;
                    None
                }
                Err(e) => {
                    tracing::warn!(%host, error = %e, "the standby of report reads is unreachable; report reads go to the primary");
                    current = None;
                    None
                }
            },
        };
        let fresh = lag.is_some_and(|lag| lag <= max_lag);
        let was = standby.fresh.swap(fresh, Ordering::Relaxed);
        if fresh != was {
            match (fresh, lag) {
                (true, _) => tracing::info!("report reads go to the standby"),
                (false, Some(lag)) => tracing::warn!(lag_secs = lag.as_secs_f64(), max_lag_secs = max_lag.as_secs(), "the standby is too far behind; report reads go to the primary until it catches up"),
                (false, None) => tracing::warn!("no usable standby; report reads go to the primary"),
            }
        }
        metrics::gauge!("upline_standby_lag_seconds")
            .set(lag.map_or(f64::NAN, |lag| lag.as_secs_f64()));
        metrics::gauge!("upline_report_reads_on_standby").set(if fresh { 1.0 } else { 0.0 });
        tokio::time::sleep(FOLLOW_EVERY).await;
    }
}

/// Points `pool` at the first host of `hosts` that is in recovery, and returns its
/// `host:port` (for logs: the URL holds the password).
async fn find_standby(hosts: &Hosts, pool: &PgPool, moved_at: &Moved) -> Option<String> {
    for url in &hosts.urls {
        if !in_recovery(url).await.unwrap_or(false) {
            continue;
        }
        let options = PgConnectOptions::from_str(url).ok()?;
        let host = format!("{}:{}", options.get_host(), options.get_port());
        tracing::info!(%host, "report reads: found a standby");
        *moved_at.lock().expect("not poisoned") = Some(Instant::now());
        pool.set_connect_options(options);
        return Some(host);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wal_position_parses_as_a_number() {
        assert_eq!(parse_lsn("0/0"), Some(0));
        assert_eq!(parse_lsn("16/B374D848"), Some((0x16 << 32) | 0xB374_D848));
        assert_eq!(parse_lsn("nonsense"), None);
        assert_eq!(parse_lsn("1/xyz"), None);
    }

    #[test]
    fn the_lag_is_the_age_of_the_newest_sample_the_standby_has_replayed() {
        let t0 = Instant::now();
        let keep = Duration::from_secs(10);
        let mut samples = Samples::default();
        for (s, lsn) in [(0, 100), (1, 100), (2, 250), (3, 400)] {
            samples.push(t0 + Duration::from_secs(s), lsn, keep);
        }
        let now = t0 + Duration::from_secs(4);
        // Caught up: only the time since the last sample.
        assert_eq!(samples.lag(400, now), Duration::from_secs(1));
        // Between two samples: the older one counts.
        assert_eq!(samples.lag(300, now), Duration::from_secs(2));
        // An idle primary: the position did not move, so the newer equal sample counts.
        assert_eq!(samples.lag(100, now), Duration::from_secs(3));
        // Behind every sample: at least the oldest one's age.
        assert_eq!(samples.lag(50, now), Duration::from_secs(4));
    }

    #[test]
    fn old_samples_are_forgotten_but_the_newest_old_one_is_kept() {
        let t0 = Instant::now();
        let keep = Duration::from_secs(3);
        let mut samples = Samples::default();
        for s in 0..10 {
            samples.push(t0 + Duration::from_secs(s), s * 10, keep);
        }
        assert_eq!(samples.0.len(), 5, "{:?}", samples.0);
        assert_eq!(samples.0[0].1, 50);
        // A standby stuck before every sample kept is at least as old as the oldest.
        assert_eq!(
            samples.lag(0, t0 + Duration::from_secs(10)),
            Duration::from_secs(5)
        );
    }
}
