//! The leaderboard snapshot (docs/contract.md §6): every `worker.leaderboard_refresh_ms`, a
//! worker rewrites `leaderboard_entries` with the top [`ENTRIES`] earners, which
//! `GET /api/leaderboard` serves. Every worker runs the schedule; the refresh itself
//! (`refresh_leaderboard` in the migrations) takes an advisory lock and skips when another
//! worker is refreshing or has just refreshed, so any number of workers refresh about once an
//! interval between them.
//!
//! Why a snapshot: the ledger rewrites each credited earner's `earner_balances` row in every
//! batch, and an index on `total_earnings` would make every one of those updates write new
//! index entries (no HOT update). docs/perf.md, "The leaderboard from a snapshot", has the
//! figures.

use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use upline_common::db::LEADERBOARD_ENTRIES as ENTRIES;

use crate::schedule::Ticks;

/// Refreshes every `every` until `cancel` fires, the first time at once; database errors are
/// logged and retried on the next tick.
pub async fn run(db: PgPool, every: Duration, cancel: CancellationToken) {
    let mut ticks = Ticks::new(every, &cancel);
    while ticks.next().await {
        // Skipped when another worker refreshed within the last half interval.
        match refresh(&db, every / 2).await {
            Ok(Some(entries)) => {
                metrics::counter!("upline_leaderboard_refreshes_total").increment(1);
                tracing::debug!(entries, "leaderboard refreshed");
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "leaderboard refresh failed; will retry"),
        }
    }
}

/// Rewrites the snapshot with the top [`ENTRIES`] earners unless another refresh is running or
/// the last one is younger than `min_age`; returns the entries written, `None` when skipped.
///
/// # Errors
/// Database errors; the previous snapshot stays.
pub async fn refresh(db: &PgPool, min_age: Duration) -> sqlx::Result<Option<i32>> {
    let written = sqlx::query_scalar!(
        r#"select refresh_leaderboard($1, make_interval(secs => $2)) as "written!""#,
        ENTRIES,
        min_age.as_secs_f64(),
    )
    .fetch_one(db)
    .await?;
    Ok((written >= 0).then_some(written))
}
