//! PostgreSQL access shared by the services: the pool, the migrations (`migrations/`), creating
//! the database when it is missing, and the earnings reads that both the api and the notifier
//! serve.

use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use backon::Retryable;
use rust_decimal::Decimal;
use sqlx::migrate::{MigrateDatabase, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::types::Json;
use sqlx::{ConnectOptions, Connection, PgExecutor, PgPool, Postgres};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::config::DatabaseSettings;
use crate::events::{EarningEvent, Totals};
use crate::money::Money;
use crate::rules::EntryKind;
use crate::{Level, UserId};

pub mod standby;

/// Entries in the leaderboard snapshot (`leaderboard_entries`, docs/contract.md §6), so also
/// the largest `limit` of `GET /api/leaderboard`.
pub const LEADERBOARD_ENTRIES: i32 = 100;

/// The schema, compiled in from `migrations/`.
pub static MIGRATOR: Migrator = sqlx::migrate!("../migrations");

/// Connects (retrying with backoff until the server answers or `cancel` fires), creating the
/// database if it does not exist, and applies pending migrations.
///
/// TLS is chosen by the URL, as libpq does: `sslmode=require` encrypts without checking the
/// certificate, `verify-ca` checks it against the built-in Mozilla roots (webpki-roots) plus
/// `sslrootcert=/path/ca.pem`, `verify-full` checks the host name too; `disable` is plain TCP,
/// and the default `prefer` tries TLS and falls back to plain TCP.
///
/// # Errors
/// A malformed URL, a failed migration, or cancellation before the database answered. A
/// configuration error is not retried: a refused server certificate, an unreadable
/// `sslrootcert`, a server without TLS under `sslmode=require`, refused credentials.
pub async fn connect_and_migrate(
    settings: &DatabaseSettings,
    cancel: &CancellationToken,
) -> anyhow::Result<PgPool> {
    connect_and_migrate_with(settings, cancel, Checkout::Ping).await
}

/// How a pool checks a connection before it hands it out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checkout {
    /// Ping every connection first (sqlx's `test_before_acquire`), one round trip: a
    /// connection the server dropped is replaced before anyone uses it. For request handlers,
    /// whose failure a client would see.
    Ping,
    /// Ping only a connection idle for [`PING_WHEN_IDLE`] or longer, as HikariCP does (its
    /// `aliveBypassWindowMs`): a connection in steady use goes out without the round trip. One
    /// the server dropped meanwhile fails its first statement instead. For the worker, whose
    /// batches treat that like a server lost mid-batch: the batch stays unacknowledged and is
    /// retried (docs/perf.md, "One ping less per batch").
    PingWhenIdle,
}

/// How long a pooled connection may sit idle and still be handed out without a ping under
/// [`Checkout::PingWhenIdle`]: 500 ms, HikariCP's default.
pub const PING_WHEN_IDLE: Duration = Duration::from_millis(500);

/// [`connect_and_migrate`], with connections checked out as `checkout` says.
///
/// # Errors
/// As [`connect_and_migrate`].
pub async fn connect_and_migrate_with(
    settings: &DatabaseSettings,
    cancel: &CancellationToken,
    checkout: Checkout,
) -> anyhow::Result<PgPool> {
    let hosts = Hosts::parse(&settings.url)?;
    let url = if hosts.urls.len() == 1 {
        hosts.urls[0].clone()
    } else {
        let find = || async { hosts.primary().await };
        let found = find
            .retry(crate::amqp::backoff())
            .sleep(tokio::time::sleep)
            .notify(|e, wait| tracing::warn!(error = %e, retry_in = ?wait, "no usable PostgreSQL host in database.url; retrying"));
        tokio::select! {
            () = cancel.cancelled() => anyhow::bail!("cancelled while looking for the PostgreSQL primary"),
            r = found => r?,
        }
    };
    let options =
        PgConnectOptions::from_str(&url).context("database.url is not a PostgreSQL URL")?;
    let create = || async {
        if !Postgres::database_exists(&url).await? {
            match Postgres::create_database(&url).await {
                // Another service created it first: 42P04 duplicate_database, or, when the two
                // `create database` run at the same moment, 23505 on pg_database's unique index.
                Err(sqlx::Error::Database(e))
                    if matches!(e.code().as_deref(), Some("42P04" | "23505")) => {}
                other => other?,
            }
            tracing::info!(
                database = options.get_database().unwrap_or("postgres"),
                "created database"
            );
        }
        Ok::<_, sqlx::Error>(())
    };
    let ready = create
        .retry(crate::amqp::backoff())
        .sleep(tokio::time::sleep)
        .when(|e| is_unreachable(e) || is_starting_up(e))
        .notify(|e, wait| tracing::warn!(error = %e, retry_in = ?wait, "PostgreSQL unreachable; retrying"));
    tokio::select! {
        () = cancel.cancelled() => anyhow::bail!("cancelled while waiting for PostgreSQL"),
        r = ready => r.context("creating the database")?,
    }
    // Set when the pool moves to another host: connections made before then are closed
    // instead of being handed out (they lead to the old primary).
    let moved_at = Moved::default();
    let pool = pool_options(settings, &moved_at, checkout)
        .connect_with(options)
        .await
        .context("connecting to PostgreSQL")?;
    MIGRATOR.run(&pool).await.context("applying migrations")?;
    if hosts.urls.len() > 1 {
        tokio::spawn(follow_primary(pool.clone(), hosts, url, moved_at));
    }
    Ok(pool)
}

/// The hosts of `database.url` (issue 13, a first part): libpq's multi-host form
/// `postgres://user@h1:5432,h2:5432/db?target_session_attrs=read-write` as one single-host URL
/// per host, in order. `target_session_attrs=read-write` (or `primary`) asks for the host
/// that is not in recovery; without it the first host that answers is used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hosts {
    pub urls: Vec<String>,
    pub read_write: bool,
}

impl Hosts {
    /// # Errors
    /// A URL without `://`, or with an empty host in its list.
    pub fn parse(url: &str) -> anyhow::Result<Hosts> {
        let (scheme, rest) = url
            .split_once("://")
            .context("database.url is not a PostgreSQL URL (postgres://…)")?;
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(authority_end);
        let (userinfo, hosts) = match authority.rsplit_once('@') {
            Some((u, h)) => (format!("{u}@"), h),
            None => (String::new(), authority),
        };
        let (path, query) = tail.split_once('?').unwrap_or((tail, ""));
        if !hosts.contains(',') {
            // One host (or a Unix socket): the URL as it is, as before.
            return Ok(Hosts {
                urls: vec![url.to_owned()],
                read_write: false,
            });
        }
        let mut read_write = false;
        let kept: Vec<&str> = query
            .split('&')
            .filter(|p| !p.is_empty())
            .filter(|p| match p.split_once('=') {
                Some(("target_session_attrs", v)) => {
                    read_write = matches!(v, "read-write" | "primary");
                    false
                }
                _ => true,
            })
            .collect();
        let query = if kept.is_empty() {
            String::new()
        } else {
            format!("?{}", kept.join("&"))
        };
        let urls = hosts
            .split(',')
            .map(|h| {
                anyhow::ensure!(!h.trim().is_empty(), "database.url lists an empty host");
                Ok(format!("{scheme}://{userinfo}{}{path}{query}", h.trim()))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Hosts { urls, read_write })
    }

    /// The first host that answers and, with `read_write`, is not in recovery (a standby).
    ///
    /// # Errors
    /// No host qualifies; the error names each host's reason.
    pub async fn primary(&self) -> anyhow::Result<String> {
        let mut reasons = Vec::new();
        for url in &self.urls {
            let host = PgConnectOptions::from_str(url)
                .map(|o| format!("{}:{}", o.get_host(), o.get_port()))
                .unwrap_or_default();
            match self.qualifies(url).await {
                Ok(true) => return Ok(url.clone()),
                Ok(false) => reasons.push(format!("{host}: a standby (in recovery)")),
                Err(e) => reasons.push(format!("{host}: {e}")),
            }
        }
        anyhow::bail!(
            "no PostgreSQL host of database.url qualifies: {}",
            reasons.join("; ")
        )
    }

    async fn qualifies(&self, url: &str) -> sqlx::Result<bool> {
        if self.read_write {
            Ok(!in_recovery(url).await?)
        } else {
            in_recovery(url).await.map(|_| true)
        }
    }
}

/// Whether the server of `url` is a standby (`pg_is_in_recovery()`), asked over a connection of
/// its own to the `postgres` database (which exists before ours is created), within 5 s.
async fn in_recovery(url: &str) -> sqlx::Result<bool> {
    let options = PgConnectOptions::from_str(url)?.database("postgres");
    let mut conn = tokio::time::timeout(Duration::from_secs(5), options.connect())
        .await
        .map_err(|_| sqlx::Error::PoolTimedOut)??;
    let standby = sqlx::query_scalar("select pg_is_in_recovery()")
        .fetch_one(&mut conn)
        .await;
    let _ = conn.close().await;
    standby
}

/// The pool settings of `settings`, with connections made before `moved_at` (set when the
/// pool is pointed at another host) closed instead of handed out, and checked out as
/// `checkout` says.
fn pool_options(
    settings: &DatabaseSettings,
    moved_at: &Moved,
    checkout: Checkout,
) -> PgPoolOptions {
    let moved = moved_at.clone();
    PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .acquire_timeout(Duration::from_secs(settings.acquire_timeout_secs.max(1)))
        .test_before_acquire(checkout == Checkout::Ping)
        .before_acquire(move |conn, meta| {
            let moved_at = *moved.lock().expect("not poisoned");
            Box::pin(async move {
                if moved_at.is_some_and(|at| meta.age >= at.elapsed()) {
                    return Ok(false);
                }
                if checkout == Checkout::PingWhenIdle && meta.idle_for >= PING_WHEN_IDLE {
                    // An error closes the connection and the pool takes another.
                    conn.ping().await?;
                }
                Ok(true)
            })
        })
}

/// When a pool was last pointed at another host (`None`: never).
type Moved = Arc<Mutex<Option<Instant>>>;

/// How often a pool over several hosts checks that its host is still the one to use.
const FOLLOW_EVERY: Duration = Duration::from_secs(1);

/// Keeps a pool over several hosts on the primary: every second, asks the pool's host whether
/// it is in recovery (or cannot be reached); if so, finds the host that qualifies now (a
/// standby promoted after a failover) and points the pool's new connections at it. The
/// connections made before are closed as they come back (`moved_at`). Ends with the pool.
async fn follow_primary(pool: PgPool, hosts: Hosts, mut current: String, moved_at: Moved) {
    while !pool.is_closed() {
        tokio::time::sleep(FOLLOW_EVERY).await;
        if hosts.qualifies(&current).await.unwrap_or(false) {
            continue;
        }
        match hosts.primary().await {
            Ok(url) if url != current => match PgConnectOptions::from_str(&url) {
                Ok(options) => {
                    tracing::warn!(
                        host = %format!("{}:{}", options.get_host(), options.get_port()),
                        "PostgreSQL primary moved; new connections go to this host"
                    );
                    *moved_at.lock().expect("not poisoned") = Some(Instant::now());
                    pool.set_connect_options(options);
                    current = url;
                }
                Err(e) => tracing::warn!(error = %e, "a host of database.url is not a URL"),
            },
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "PostgreSQL primary unreachable"),
        }
    }
}

/// Whether a failure to connect may go away by itself (server down, restarting, not yet
/// resolvable), as opposed to a configuration error that retrying would only hide: sqlx reports
/// a TLS handshake the client refused (untrusted certificate, wrong host name) as an I/O error
/// of kind `InvalidData`, and an unreadable `sslrootcert` as `NotFound`/`PermissionDenied`;
/// [`sqlx::Error::Tls`] is a bad certificate file or a server without TLS.
fn is_unreachable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(io) => !matches!(
            io.kind(),
            std::io::ErrorKind::InvalidData
                | std::io::ErrorKind::NotFound
                | std::io::ErrorKind::PermissionDenied
        ),
        sqlx::Error::PoolTimedOut => true,
        _ => false,
    }
}

fn is_starting_up(e: &sqlx::Error) -> bool {
    // 57P03: the database system is starting up.
    matches!(e, sqlx::Error::Database(d) if d.code().as_deref() == Some("57P03"))
}

/// What a database error says about the work that met it: the one place where errors are
/// classified (README "Reliability").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Nothing is wrong with the input: the database is unreachable, restarting, failing over
    /// (read-only), overloaded, timing out, or its schema is not the one this binary expects
    /// yet (a rolling deploy). Back off and retry; leave messages unacknowledged; report not
    /// ready. Never reject or dead-letter because of it.
    Infrastructure,
    /// The input itself cannot be recorded (a value out of range, a constraint it violates):
    /// reject or dead-letter it with the reason.
    Content,
}

/// Classifies a database error. Only data exceptions (SQLSTATE class 22) and integrity
/// violations (class 23) blame the input; everything else, known or not, is treated as
/// infrastructure, so that an unknown failure stalls work visibly instead of discarding it.
pub fn classify(e: &sqlx::Error) -> ErrorClass {
    match e {
        sqlx::Error::Database(d) => match d.code().as_deref().map(|c| c.get(..2).unwrap_or(c)) {
            Some("22" | "23") => ErrorClass::Content,
            _ => ErrorClass::Infrastructure,
        },
        sqlx::Error::Encode(_) => ErrorClass::Content,
        _ => ErrorClass::Infrastructure,
    }
}

/// A row of `earnings` (a ledger entry of any kind), convertible to the event of contract §4.
#[derive(Debug)]
pub struct EarningRow {
    pub id: i64,
    pub earner_id: UserId,
    pub seq: i64,
    pub kind: EntryKind,
    pub source_user_id: Option<UserId>,
    pub purchase_id: Option<String>,
    pub level: Option<Level>,
    pub rate: Option<Decimal>,
    pub amount: Decimal,
    pub currency: String,
    pub refers_to: Option<i64>,
    pub refund_id: Option<String>,
    pub payout_id: Option<i64>,
    pub totals: Json<Totals>,
    pub created_at: OffsetDateTime,
}

impl From<EarningRow> for EarningEvent {
    fn from(r: EarningRow) -> Self {
        EarningEvent {
            earning_id: r.id,
            seq: r.seq,
            earner_id: r.earner_id,
            kind: r.kind,
            source_user_id: r.source_user_id,
            purchase_id: r.purchase_id,
            level: r.level,
            rate: r.rate.map(|rate| rate.normalize()),
            amount: Money::from_total(r.amount),
            currency: r.currency,
            refers_to: r.refers_to,
            refund_id: r.refund_id,
            payout_id: r.payout_id,
            totals: r.totals.0,
            created_at: r.created_at,
        }
    }
}

/// A user's earnings with `seq` greater than `after_seq`, oldest first, at most `limit`.
///
/// # Errors
/// Database errors.
pub async fn earnings_after(
    db: impl PgExecutor<'_>,
    earner_id: UserId,
    after_seq: i64,
    limit: i64,
) -> sqlx::Result<Vec<EarningEvent>> {
    let rows = sqlx::query_as!(
        EarningRow,
        r#"select id, earner_id as "earner_id: UserId", seq, kind as "kind: EntryKind",
                  source_user_id as "source_user_id: UserId", purchase_id, level as "level: Level",
                  rate, amount, currency, refers_to, refund_id, payout_id,
                  totals as "totals: Json<Totals>", created_at
           from earnings where earner_id = $1 and seq > $2 order by seq limit $3"#,
        earner_id.get(),
        after_seq,
        limit,
    )
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().map(EarningEvent::from).collect())
}

/// A user's newest earnings, newest first.
///
/// # Errors
/// Database errors.
pub async fn recent_earnings(
    db: impl PgExecutor<'_>,
    earner_id: UserId,
    limit: i64,
) -> sqlx::Result<Vec<EarningEvent>> {
    let rows = sqlx::query_as!(
        EarningRow,
        r#"select id, earner_id as "earner_id: UserId", seq, kind as "kind: EntryKind",
                  source_user_id as "source_user_id: UserId", purchase_id, level as "level: Level",
                  rate, amount, currency, refers_to, refund_id, payout_id,
                  totals as "totals: Json<Totals>", created_at
           from earnings where earner_id = $1 order by seq desc limit $2"#,
        earner_id.get(),
        limit,
    )
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().map(EarningEvent::from).collect())
}

/// Earnings with `id` greater than `after_id` across all users, oldest first (the admin feed).
///
/// # Errors
/// Database errors.
pub async fn all_earnings_after(
    db: impl PgExecutor<'_>,
    after_id: i64,
    limit: i64,
) -> sqlx::Result<Vec<EarningEvent>> {
    let rows = sqlx::query_as!(
        EarningRow,
        r#"select id, earner_id as "earner_id: UserId", seq, kind as "kind: EntryKind",
                  source_user_id as "source_user_id: UserId", purchase_id, level as "level: Level",
                  rate, amount, currency, refers_to, refund_id, payout_id,
                  totals as "totals: Json<Totals>", created_at
           from earnings where id > $1 order by id limit $2"#,
        after_id,
        limit,
    )
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().map(EarningEvent::from).collect())
}

/// The `seq` of a user's latest earning (0 when none); `None` when the user does not exist.
///
/// # Errors
/// Database errors.
pub async fn latest_seq(db: impl PgExecutor<'_>, user_id: UserId) -> sqlx::Result<Option<i64>> {
    sqlx::query_scalar!(
        "select earnings_seq from earner_balances where user_id = $1",
        user_id.get()
    )
    .fetch_optional(db)
    .await
}

#[cfg(test)]
mod hosts_tests {
    use super::Hosts;

    #[test]
    fn a_multi_host_url_becomes_one_url_per_host() {
        let hosts = Hosts::parse(
            "postgres://app:pw@db1:5432,db2:5433/upline?sslmode=require&target_session_attrs=read-write",
        )
        .unwrap();
        assert_eq!(
            hosts.urls,
            [
                "postgres://app:pw@db1:5432/upline?sslmode=require",
                "postgres://app:pw@db2:5433/upline?sslmode=require"
            ]
        );
        assert!(hosts.read_write);
        let any = Hosts::parse("postgres://h1,h2/upline").unwrap();
        assert_eq!(any.urls, ["postgres://h1/upline", "postgres://h2/upline"]);
        assert!(!any.read_write);
        for single in [
            "postgres://postgres@127.0.0.1:5432/upline",
            "postgres:///upline?host=/var/run/postgresql",
            "postgres://[::1]:5432/upline?target_session_attrs=read-write",
        ] {
            assert_eq!(Hosts::parse(single).unwrap().urls, [single]);
        }
        assert!(Hosts::parse("postgres://h1,,h2/upline").is_err());
        assert!(Hosts::parse("upline").is_err());
    }
}
