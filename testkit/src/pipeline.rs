//! What the pipeline has recorded so far, read straight from its database: how many purchases
//! are in the ledger, how many earning events still wait in the outbox; and a value from a
//! service's `/metrics`.

use std::time::{Duration, Instant};

use anyhow::bail;
use sqlx::PgPool;

/// Purchases recorded (processed or rejected), all ids.
///
/// # Errors
/// Database errors.
pub async fn purchases(db: &PgPool) -> sqlx::Result<i64> {
    sqlx::query_scalar("select count(*) from purchases")
        .fetch_one(db)
        .await
}

/// How close [`purchases_towards`] gets to its target on the statistics' estimate before it
/// counts exactly: more than a few seconds of a drain, so that a statistics flush that is late
/// (a backend flushes at most once a second while busy) cannot hide the end.
const EXACT_WITHIN: i64 = 50_000;

/// Purchases recorded, for polling a drain towards `target` without slowing it. While
/// PostgreSQL's statistics (`n_tup_ins` of `purchases`: up to about a second old, and counting
/// aborted inserts) put it more than 50,000 below `target`, that estimate is returned; closer
/// than that, the exact [`purchases`]. An exact `count(*)` scans the table: polled every 250 ms
/// through a 200,000-purchase drain it took 6–8 % of PostgreSQL's time.
///
/// # Errors
/// Database errors.
pub async fn purchases_towards(db: &PgPool, target: i64) -> sqlx::Result<i64> {
    let inserted: i64 = sqlx::query_scalar(
        "select coalesce(sum(n_tup_ins), 0)::int8 from pg_stat_user_tables where relname = 'purchases'",
    )
    .fetch_one(db)
    .await?;
    if inserted + EXACT_WITHIN < target {
        Ok(inserted)
    } else {
        purchases(db).await
    }
}

/// Earning events committed but not yet confirmed by the broker (`earning_outbox`).
///
/// # Errors
/// Database errors.
pub async fn outbox(db: &PgPool) -> sqlx::Result<i64> {
    sqlx::query_scalar("select count(*) from earning_outbox")
        .fetch_one(db)
        .await
}

/// Waits until the outbox is empty (every earning event published), polling every 50 ms.
///
/// # Errors
/// Database errors, or events still in the outbox after `within`.
pub async fn wait_outbox_empty(db: &PgPool, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let pending = outbox(db).await?;
        if pending == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{pending} earnings never left the outbox (waited {within:?})");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The value of the first sample in `metrics` (a service's `/metrics`, Prometheus text) whose
/// line `picks`; `None` when no line does or its value is not a number.
pub fn metric_value(metrics: &str, picks: impl Fn(&str) -> bool) -> Option<f64> {
    metrics
        .lines()
        .find(|l| picks(l))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
}
