//! PostgreSQL access shared by the services: the pool, the migrations (`migrations/`), creating
//! the database when it is missing, and the earnings reads that both the api and the notifier
//! serve.

use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use backon::Retryable;
use rust_decimal::Decimal;
use sqlx::migrate::{MigrateDatabase, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::types::Json;
use sqlx::{PgExecutor, PgPool, Postgres};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::config::DatabaseSettings;
use crate::events::{EarningEvent, Totals};
use crate::money::Money;
use crate::rules::EntryKind;
use crate::{Level, UserId};

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
    let options = PgConnectOptions::from_str(&settings.url)
        .context("database.url is not a PostgreSQL URL")?;
    let create = || async {
        if !Postgres::database_exists(&settings.url).await? {
            match Postgres::create_database(&settings.url).await {
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
    let pool = PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .acquire_timeout(Duration::from_secs(settings.acquire_timeout_secs.max(1)))
        .connect_with(options)
        .await
        .context("connecting to PostgreSQL")?;
    MIGRATOR.run(&pool).await.context("applying migrations")?;
    Ok(pool)
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
