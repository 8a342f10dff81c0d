//! The outbox relay: publishes earnings committed in `earning_outbox` to `upline.earnings`
//! with publisher confirms, and deletes them only once the broker confirmed.
//!
//! Why an outbox: the ledger commit and the broker publish cannot be one atomic step. Writing
//! the event into `earning_outbox` in the ledger's own transaction means a worker that dies
//! between commit and publish leaves the rows behind, and any worker's relay publishes them on
//! its next sweep. Delivery is at least once; the notifier drops duplicates by `seq`.
//!
//! No transaction is ever open while the relay waits for the broker (a broker under a memory
//! or disk alarm blocks publishers for as long as the alarm lasts):
//!
//! 1. **Claim**: one statement leases up to [`BATCH`] rows that nobody holds (or whose lease
//!    expired): `claimed_by` = this relay, `claimed_until` = now + the lease, taken `for update
//!    skip locked` so relays of several workers share the work, committed at once.
//! 2. **Publish** them and await the confirms, with no transaction open, within
//!    `confirm_timeout`.
//! 3. **Delete** the confirmed rows in a second short transaction. Refused (nacked) rows are
//!    released at once; rows whose confirm did not come in time keep their lease until it
//!    expires, and are then taken over by any relay, this one included.
//!
//! A nack or a confirm timeout does not end the worker's broker session: the relay backs off
//! (doubling up to [`MAX_BACKOFF`]) and tries again. While RabbitMQ holds the connection
//! blocked (`connection.blocked`), the relay claims nothing and waits for `unblocked`.
//! Only a lost connection ends the relay with an error, for the caller to reconnect.

use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::publisher_confirm::PublisherConfirm;
use lapin::{Channel, Connection};
use sqlx::types::Json;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use upline_common::amqp;
use upline_common::db::EarningRow;
use upline_common::events::{EarningEvent, Totals};
use upline_common::rules::EntryKind;
use upline_common::{Level, UserId};

/// Most earnings leased and published at once.
const BATCH: i64 = 500;
/// Longest pause between attempts after a nack, a confirm timeout or a database error.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How often a blocked connection is looked at again.
const BLOCKED_POLL: Duration = Duration::from_millis(200);
/// The backlog gauge is refreshed at most this often.
const BACKLOG_EVERY: Duration = Duration::from_secs(1);
/// Up to this many rows the backlog gauge is an exact count; above, the planner's estimate.
const BACKLOG_EXACT_UP_TO: i64 = 100_000;

/// How a relay runs.
#[derive(Debug, Clone, Copy)]
pub struct RelayOptions {
    /// Sweep interval for rows other relays left behind (or leases that expired).
    pub poll: Duration,
    /// How long publishing a batch and receiving its confirms may take before the relay
    /// gives up on that attempt; the lease is twice this plus a second.
    pub confirm_timeout: Duration,
}

impl RelayOptions {
    fn lease(&self) -> Duration {
        self.confirm_timeout * 2 + Duration::from_secs(1)
    }
}

/// Why one relay attempt did not publish everything it claimed.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// Claiming, deleting or releasing rows failed; the leases expire by themselves.
    #[error("outbox relay: database error: {0}")]
    Db(#[from] sqlx::Error),
    /// The channel or connection failed.
    #[error("outbox relay: broker error: {0}")]
    Broker(#[from] lapin::Error),
    /// The broker refused (nacked) some events; they were released for another attempt.
    #[error("outbox relay: the broker refused {0} earning events")]
    Refused(usize),
    /// Publishing or the confirms took longer than `confirm_timeout` (a blocked or overloaded
    /// broker); the unconfirmed rows keep their lease until it expires.
    #[error("outbox relay: {0} earning events not confirmed within the timeout")]
    Timeout(usize),
}

/// Relays until `cancel` fires: right after a commit that queued earnings (`ready`), and every
/// `options.poll` for rows another worker left behind.
///
/// # Errors
/// The broker connection is lost (the caller reconnects). Nacks, timeouts and database errors
/// are retried here with backoff.
pub async fn relay(
    db: PgPool,
    conn: &Connection,
    ready: Arc<Notify>,
    options: RelayOptions,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let relay_id = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    );
    let mut channel = open_channel(conn).await?;
    let mut failures = 0u32;
    let mut backlog_at: Option<Instant> = None;
    let result = loop {
        // A sweep: batches until one comes back short, the broker blocks, or an attempt fails.
        let mut broken = None;
        while !conn.status().blocked() {
            match relay_batch(&db, &channel, &relay_id, options).await {
                Ok(n) => {
                    failures = 0;
                    if n < BATCH as usize {
                        break;
                    }
                }
                Err(RelayError::Broker(e)) => {
                    broken = Some(e);
                    break;
                }
                Err(e) => {
                    failures += 1;
                    tracing::warn!(error = %e, failures, "outbox relay: attempt failed; backing off");
                    metrics::counter!("upline_outbox_relay_failures_total", "reason" => reason(&e))
                        .increment(1);
                    break;
                }
            }
        }
        if let Some(e) = broken {
            if !conn.status().connected() {
                break Err(anyhow::Error::from(e).context("outbox relay: connection lost"));
            }
            // Only the channel failed: open another on the same connection.
            tracing::warn!(error = %e, "outbox relay: channel failed; opening another");
            failures += 1;
            match open_channel(conn).await {
                Ok(c) => channel = c,
                Err(e) => break Err(e.context("outbox relay: reopening the channel")),
            }
        }
        if backlog_at.is_none_or(|at| at.elapsed() >= BACKLOG_EVERY) {
            backlog_at = Some(Instant::now());
            match backlog(&db).await {
                Ok(n) => metrics::gauge!("upline_outbox_backlog").set(n as f64),
                Err(e) => tracing::debug!(error = %e, "outbox relay: backlog not measured"),
            }
        }
        let wait = if conn.status().blocked() {
            BLOCKED_POLL
        } else if failures > 0 {
            (Duration::from_millis(100) * 2u32.pow(failures.min(6))).min(MAX_BACKOFF)
        } else {
            options.poll
        };
        tokio::select! {
            () = cancel.cancelled() => break Ok(()),
            () = ready.notified(), if failures == 0 => {}
            () = tokio::time::sleep(wait) => {}
        }
    };
    if result.is_ok() {
        // Publish what the last in-flight purchases committed before stopping (the worker
        // stops its relay after its consumers).
        while !conn.status().blocked() {
            match relay_batch(&db, &channel, &relay_id, options).await {
                Ok(n) if n == BATCH as usize => {}
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "outbox relay: last sweep failed; the rows stay queued");
                    break;
                }
            }
        }
    }
    // Hand back whatever this relay still holds, so the next relay need not wait for the lease.
    if let Err(e) = release_all(&db, &relay_id).await {
        tracing::warn!(error = %e, "outbox relay: leases not released; they will expire");
    }
    if channel.status().connected() && !conn.status().blocked() {
        let _ = tokio::time::timeout(
            options.confirm_timeout,
            channel.close(200, "relay stopping"),
        )
        .await;
    }
    result
}

async fn open_channel(conn: &Connection) -> anyhow::Result<Channel> {
    let channel = conn.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

fn reason(e: &RelayError) -> &'static str {
    match e {
        RelayError::Db(_) => "database",
        RelayError::Broker(_) => "broker",
        RelayError::Refused(_) => "refused",
        RelayError::Timeout(_) => "timeout",
    }
}

/// Claims, publishes and deletes up to [`BATCH`] outbox rows, oldest first; returns how many
/// were claimed.
async fn relay_batch(
    db: &PgPool,
    channel: &Channel,
    relay_id: &str,
    options: RelayOptions,
) -> Result<usize, RelayError> {
    let rows = claim(db, relay_id, options.lease()).await?;
    let claimed = rows.len();
    if claimed == 0 {
        return Ok(0);
    }
    let deadline = tokio::time::Instant::now() + options.confirm_timeout;
    // Pipelined: publish everything, then wait for the confirms. Publishing itself waits while
    // the connection is blocked, hence the deadline around both.
    let published = tokio::time::timeout_at(deadline, async {
        let mut confirms: Vec<(i64, PublisherConfirm)> = Vec::with_capacity(rows.len());
        for row in rows {
            let id = row.id;
            let event = EarningEvent::from(row);
            let body = serde_json::to_vec(&event).expect("an EarningEvent always serialises");
            let confirm = channel
                .basic_publish(
                    amqp::EARNINGS_EXCHANGE,
                    &event.routing_key(),
                    BasicPublishOptions::default(),
                    &body,
                    amqp::persistent_json(),
                )
                .await?;
            confirms.push((id, confirm));
        }
        Ok::<_, lapin::Error>(confirms)
    })
    .await;
    let confirms = match published {
        Err(_elapsed) => return Err(RelayError::Timeout(claimed)),
        Ok(Err(e)) => return Err(RelayError::Broker(e)),
        Ok(Ok(confirms)) => confirms,
    };
    let mut confirmed = Vec::with_capacity(claimed);
    let mut refused = Vec::new();
    let mut outcome = Ok(());
    for (id, confirm) in confirms {
        match tokio::time::timeout_at(deadline, confirm).await {
            Ok(Ok(c)) if c.is_ack() => confirmed.push(id),
            Ok(Ok(_nack)) => refused.push(id),
            Ok(Err(e)) => {
                outcome = Err(RelayError::Broker(e));
                break;
            }
            Err(_elapsed) => {
                outcome = Err(RelayError::Timeout(
                    claimed - confirmed.len() - refused.len(),
                ));
                break;
            }
        }
    }
    // Whatever happened to the rest, what the broker confirmed is done.
    if !confirmed.is_empty() {
        delete(db, &confirmed).await?;
        metrics::counter!("upline_earning_events_published_total")
            .increment(confirmed.len() as u64);
    }
    if !refused.is_empty() {
        release(db, relay_id, &refused).await?;
        outcome = outcome.and(Err(RelayError::Refused(refused.len())));
    }
    outcome.map(|()| claimed)
}

/// Leases up to [`BATCH`] rows nobody holds, oldest first, in one committed statement; returns
/// their earnings.
async fn claim(db: &PgPool, relay_id: &str, lease: Duration) -> sqlx::Result<Vec<EarningRow>> {
    sqlx::query_as!(
        EarningRow,
        r#"with claimed as (
               update earning_outbox
               set claimed_by = $2, claimed_until = now() + make_interval(secs => $3)
               where earning_id in (
                   select earning_id from earning_outbox
                   where claimed_until is null or claimed_until < now()
                   order by earning_id limit $1 for update skip locked
               )
               returning earning_id
           )
           select id, earner_id as "earner_id: UserId", seq, kind as "kind: EntryKind",
                  source_user_id as "source_user_id: UserId", purchase_id, level as "level: Level",
                  rate, amount, currency, refers_to, refund_id, payout_id,
                  totals as "totals: Json<Totals>", created_at
           from earnings
           where id in (select earning_id from claimed) order by id"#,
        BATCH,
        relay_id,
        lease.as_secs_f64(),
    )
    .fetch_all(db)
    .await
}

/// Deletes confirmed rows, whoever holds them now (the event is out either way).
async fn delete(db: &PgPool, ids: &[i64]) -> sqlx::Result<()> {
    let mut tx = db.begin().await?;
    // Forgetting a delete in a crash only means publishing again (at least once, duplicates are
    // dropped by seq downstream), so this transaction need not wait for its WAL flush.
    sqlx::query!("set local synchronous_commit = off")
        .execute(&mut *tx)
        .await?;
    sqlx::query!("delete from earning_outbox where earning_id = any($1)", ids)
        .execute(&mut *tx)
        .await?;
    tx.commit().await
}

/// Gives rows back (still held by this relay) for any relay to take at once.
async fn release(db: &PgPool, relay_id: &str, ids: &[i64]) -> sqlx::Result<()> {
    sqlx::query!(
        "update earning_outbox set claimed_by = null, claimed_until = null \
         where earning_id = any($1) and claimed_by = $2",
        ids,
        relay_id,
    )
    .execute(db)
    .await
    .map(drop)
}

/// Gives back every row this relay still holds.
async fn release_all(db: &PgPool, relay_id: &str) -> sqlx::Result<()> {
    sqlx::query!(
        "update earning_outbox set claimed_by = null, claimed_until = null where claimed_by = $1",
        relay_id,
    )
    .execute(db)
    .await
    .map(drop)
}

/// Rows in the outbox: exact up to [`BACKLOG_EXACT_UP_TO`] (an index-only scan that stops
/// there), the planner's estimate above.
async fn backlog(db: &PgPool) -> sqlx::Result<i64> {
    sqlx::query_scalar!(
        r#"select case when c.n <= $1::int8 then c.n
                       else greatest(c.n, (select reltuples::int8 from pg_class
                                           where oid = 'earning_outbox'::regclass))
                  end as "rows!"
           from (select count(*) as n from (select 1 from earning_outbox limit $1::int8 + 1) t) c"#,
        BACKLOG_EXACT_UP_TO,
    )
    .fetch_one(db)
    .await
}
