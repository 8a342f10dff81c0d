//! The outbox relay: publishes earnings committed in `earning_outbox` to `upline.earnings`
//! with publisher confirms, and deletes them only once the broker confirmed.
//!
//! Why an outbox: the ledger commit and the broker publish cannot be one atomic step. Writing
//! the event into `earning_outbox` in the ledger's own transaction means a worker that dies
//! between commit and publish leaves the rows behind, and any worker's relay publishes them on
//! its next sweep. Rows are taken with `for update skip locked`, so relays of several workers
//! share the work. Delivery is at least once; the notifier drops duplicates by `seq`.

use std::sync::Arc;
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::Connection;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use upline_common::amqp;
use upline_common::db::{EarningRow, EARNING_COLUMNS};
use upline_common::events::EarningEvent;

/// Earnings published per relay transaction.
const BATCH: i64 = 500;

/// Relays until `cancel` fires: right after a commit that queued earnings (`ready`), and every
/// `poll` for rows another worker left behind.
///
/// # Errors
/// Broker errors (the caller reconnects); database errors are retried here.
pub async fn relay(
    db: PgPool,
    conn: &Connection,
    ready: Arc<Notify>,
    poll: Duration,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let channel = conn.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    loop {
        loop {
            match relay_batch(&db, &channel).await {
                Ok(n) if n < BATCH as usize => break,
                Ok(_) => {}
                Err(RelayError::Broker(e)) => return Err(e),
                Err(RelayError::Db(e)) => {
                    tracing::warn!(error = %e, "outbox relay: database error; retrying");
                    break;
                }
            }
        }
        tokio::select! {
            () = cancel.cancelled() => break,
            () = ready.notified() => {}
            () = tokio::time::sleep(poll) => {}
        }
    }
    // Publish what the last in-flight purchases committed before stopping.
    let _ = relay_batch(&db, &channel).await;
    let _ = channel.close(200, "relay stopping").await;
    Ok(())
}

enum RelayError {
    Db(sqlx::Error),
    Broker(anyhow::Error),
}

impl From<sqlx::Error> for RelayError {
    fn from(e: sqlx::Error) -> Self {
        RelayError::Db(e)
    }
}

impl From<lapin::Error> for RelayError {
    fn from(e: lapin::Error) -> Self {
        RelayError::Broker(e.into())
    }
}

/// Publishes up to [`BATCH`] outbox rows, oldest first; returns how many.
async fn relay_batch(db: &PgPool, channel: &lapin::Channel) -> Result<usize, RelayError> {
    let mut tx = db.begin().await?;
    // Forgetting a delete in a crash only means publishing again (at least once, duplicates are
    // dropped by seq downstream), so this transaction need not wait for its WAL flush.
    sqlx::query("set local synchronous_commit = off")
        .execute(&mut *tx)
        .await?;
    let rows: Vec<EarningRow> = sqlx::query_as(&format!(
        r#"select {EARNING_COLUMNS} from earnings where id in (
               select earning_id from earning_outbox order by earning_id limit $1 for update skip locked
           ) order by id"#
    ))
    .bind(BATCH)
    .fetch_all(&mut *tx)
    .await?;
    if rows.is_empty() {
        return Ok(0);
    }
    let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
    // Pipelined: publish everything, then wait for the confirms.
    let mut confirms = Vec::with_capacity(rows.len());
    for row in rows {
        let event = EarningEvent::from(row);
        let body = serde_json::to_vec(&event).expect("an EarningEvent always serialises");
        confirms.push(
            channel
                .basic_publish(
                    amqp::EARNINGS_EXCHANGE,
                    &event.routing_key(),
                    BasicPublishOptions::default(),
                    &body,
                    amqp::persistent_json(),
                )
                .await?,
        );
    }
    for confirm in confirms {
        if !confirm.await?.is_ack() {
            return Err(RelayError::Broker(anyhow::anyhow!(
                "the broker refused an earning event"
            )));
        }
    }
    sqlx::query("delete from earning_outbox where earning_id = any($1)")
        .bind(&ids)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    metrics::counter!("upline_earning_events_published_total").increment(ids.len() as u64);
    Ok(ids.len())
}
