//! Raw message bodies are kept only for `privacy.raw_body_retention` (README "Security"):
//! producers may put anything in a purchase message, and the parsed fields plus the
//! fingerprint are all the ledger and the idempotency check need. Every worker sweeps; rows
//! are taken with `for update skip locked`, so several workers share the work without waiting
//! on each other, and a sweep missed during downtime is caught up by the next.

use std::future::Future;
use std::time::Duration;

use sqlx::postgres::PgQueryResult;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::schedule::Ticks;

/// Rows cleared per statement, so that one sweep never holds many row locks for long.
const CHUNK: i64 = 1000;

/// How often to sweep: a tenth of the retention, between 1 s and 60 s.
pub fn sweep_interval(retention: Duration) -> Duration {
    (retention / 10).clamp(Duration::from_secs(1), Duration::from_secs(60))
}

/// Sweeps until `cancel` fires; database errors are logged and retried on the next sweep.
pub async fn run(db: PgPool, retention: Duration, cancel: CancellationToken) {
    let mut ticks = Ticks::new(sweep_interval(retention), &cancel);
    while ticks.next().await {
        match drop_raw_bodies(&db, retention, &cancel).await {
            Ok(0) => {}
            Ok(n) => {
                metrics::counter!("upline_raw_bodies_dropped_total").increment(n);
                tracing::debug!(rows = n, "dropped raw message bodies past their retention");
            }
            Err(e) => tracing::warn!(error = %e, "raw body retention sweep failed; will retry"),
        }
    }
}

/// Clears the raw bodies of purchases and conflicting re-sends older than `retention`;
/// returns how many rows it cleared.
///
/// # Errors
/// Database errors.
pub async fn drop_raw_bodies(
    db: &PgPool,
    retention: Duration,
    cancel: &CancellationToken,
) -> sqlx::Result<u64> {
    let secs = i64::try_from(retention.as_secs()).unwrap_or(i64::MAX) as f64;
    let purchases = in_chunks(cancel, || {
        sqlx::query!(
            r#"update purchases set body = null
               where purchase_id = any(array(
                   select purchase_id from purchases
                   where body is not null and processed_at < now() - make_interval(secs => $1)
                   limit $2 for update skip locked))"#,
            secs,
            CHUNK,
        )
        .execute(db)
    })
    .await?;
    let conflicts = in_chunks(cancel, || {
        sqlx::query!(
            r#"update purchase_conflicts set body = null
               where id = any(array(
                   select id from purchase_conflicts
                   where body is not null and received_at < now() - make_interval(secs => $1)
                   limit $2 for update skip locked))"#,
            secs,
            CHUNK,
        )
        .execute(db)
    })
    .await?;
    Ok(purchases + conflicts)
}

/// Runs `clear` (one statement clearing at most [`CHUNK`] rows) until a run clears fewer, or
/// `cancel` fires; returns how many rows were cleared.
async fn in_chunks<F, Fut>(cancel: &CancellationToken, mut clear: F) -> sqlx::Result<u64>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = sqlx::Result<PgQueryResult>>,
{
    let mut cleared = 0;
    loop {
        let n = clear().await?.rows_affected();
        cleared += n;
        if n < CHUNK as u64 || cancel.is_cancelled() {
            return Ok(cleared);
        }
    }
}
