//! The outbox relay: publishes earnings committed in `earning_outbox` to `upline.earnings`
//! with publisher confirms, and deletes them only once the broker confirmed.
//!
//! Why an outbox: the ledger commit and the broker publish cannot be one atomic step. Writing
//! the event into `earning_outbox` in the ledger's own transaction means a worker that dies
//! between commit and publish leaves the rows behind, and any worker's relay publishes them on
//! its next sweep. Delivery is at least once; the notifier drops duplicates by `seq`.
//!
//! **Published right after the commit; the outbox is the recovery path.** The purchase
//! ledger inserts its outbox rows already leased to this worker's relay ([`Lease`]) and hands
//! the batch's events over in memory ([`Direct`]): the relay publishes them at once, with no
//! claim statement and no read back of the earnings. Only if this worker dies, or the broker
//! does not confirm in time, do the rows wait for the lease to expire and a sweep to take
//! them. The sweep also publishes the entries written outside the purchase path (reversals,
//! approvals, payouts), which are queued free.
//!
//! No transaction is ever open while the relay waits for the broker (a broker under a memory
//! or disk alarm blocks publishers for as long as the alarm lasts):
//!
//! A sweep, like the direct path after its hand-over, goes:
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
//! **Direct batches are pipelined.** The relay publishes a handed-over batch and goes on to
//! the next one at once; the batch's confirms and the delete of its rows settle in a task of
//! their own, up to [`SETTLING_BATCHES`] at a time. Events go out on one channel in the order
//! they were handed over, so each earner's `seq` order is kept. Sweeps publish and settle one
//! batch at a time, as before.
//!
//! A nack or a confirm timeout does not end the worker's broker session: the relay backs off
//! (doubling up to [`MAX_BACKOFF`]) and tries again. While RabbitMQ holds the connection
//! blocked (`connection.blocked`), the relay claims nothing and waits for `unblocked`.
//! Only a lost connection ends the relay with an error, for the caller to reconnect.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use futures_util::future;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::publisher_confirm::PublisherConfirm;
use lapin::{Channel, Connection};
use sqlx::types::Json;
use sqlx::PgPool;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use upline_common::amqp;
use upline_common::db::EarningRow;
use upline_common::events::{EarningEvent, Totals};
use upline_common::rules::EntryKind;
use upline_common::{Level, UserId};

/// Most earnings leased and published at once.
const BATCH: i64 = 500;
/// Committed batches a worker's consumers may hand its relay ahead of what it has published.
pub const DIRECT_BATCHES: usize = 8;
/// Direct batches whose confirms and delete may be outstanding at once; while this many are,
/// the relay takes no further batch from its consumers.
pub const SETTLING_BATCHES: usize = 8;
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
    /// The task settling a batch's confirms ended abnormally (it panicked); its rows keep
    /// their lease until it expires.
    #[error("outbox relay: settling a batch failed: {0}")]
    Settling(String),
}

/// The events of a committed batch, handed from a worker's consumers to its relay so that
/// they are published straight after the commit. Their outbox rows were inserted leased to
/// [`Direct::lease`]'s holder (this worker's relay), so no other relay publishes them
/// meanwhile; if this worker dies first, the lease expires and any relay's sweep takes them.
#[derive(Clone)]
pub struct Direct {
    /// The lease the ledger gives the outbox rows of the batches it hands over.
    pub lease: Lease,
    sender: mpsc::Sender<Vec<EarningEvent>>,
    /// Taken by the (one) relay running in this worker; kept across broker sessions, so what
    /// one session did not publish the next one does.
    inbox: Arc<tokio::sync::Mutex<mpsc::Receiver<Vec<EarningEvent>>>>,
}

/// Who holds a row of `earning_outbox`, and for how long from its insert.
#[derive(Debug, Clone)]
pub struct Lease {
    /// The relay's name, `<pid>-<nanoseconds since the epoch>`: unique per worker process.
    pub holder: String,
    pub duration: Duration,
}

impl Direct {
    /// A hand-off for a worker whose relay runs with `options`: the lease is the relay's
    /// (twice the confirm timeout plus a second).
    pub fn new(options: RelayOptions) -> Direct {
        let holder = format!(
            "{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        );
        let (sender, receiver) = mpsc::channel(DIRECT_BATCHES);
        Direct {
            lease: Lease {
                holder,
                duration: options.lease(),
            },
            sender,
            inbox: Arc::new(tokio::sync::Mutex::new(receiver)),
        }
    }

    /// Hands a committed batch's events to the relay. While the relay is [`DIRECT_BATCHES`]
    /// batches behind this waits (the consumers slow down to what the broker takes), but at
    /// most half the lease: then the events are left to the outbox, whose sweep publishes them
    /// once their lease has expired.
    pub async fn hand_over(&self, events: Vec<EarningEvent>) {
        if events.is_empty() {
            return;
        }
        let n = events.len();
        match tokio::time::timeout(self.lease.duration / 2, self.sender.send(events)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) | Err(_) => {
                tracing::debug!(
                    events = n,
                    "relay behind; these events are left to the outbox sweep"
                );
                metrics::counter!("upline_outbox_handover_overflows_total").increment(1);
            }
        }
    }
}

/// Relays until `cancel` fires: each batch `direct` hands over, right away; and a sweep of the
/// outbox for rows nobody holds (another worker's lease expired, or entries written outside
/// the purchase path: refunds, approvals, payouts) after every `ready` and every
/// `options.poll`.
///
/// # Errors
/// The broker connection is lost (the caller reconnects). Nacks, timeouts and database errors
/// are retried here with backoff.
pub async fn relay(
    db: PgPool,
    conn: &Connection,
    direct: &Direct,
    ready: Arc<Notify>,
    options: RelayOptions,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let relay_id = direct.lease.holder.as_str();
    let mut inbox = direct.inbox.lock().await;
    let mut channel = open_channel(conn).await?;
    let mut failures = 0u32;
    let mut backlog_at: Option<Instant> = None;
    // The first sweep at once: rows other workers left behind.
    let mut sweep_at = tokio::time::Instant::now();
    // Direct batches published and not yet settled, oldest first.
    let mut settling: VecDeque<JoinHandle<Result<usize, RelayError>>> = VecDeque::new();
    let result = loop {
        enum Wake {
            Direct(Vec<EarningEvent>),
            Settled(Result<usize, RelayError>),
            Sweep,
        }
        let wake = tokio::select! {
            () = cancel.cancelled() => break Ok(()),
            // The oldest batch first: the relay waits for nothing else to settle.
            joined = async { settling.front_mut().expect("guarded: not empty").await },
                if !settling.is_empty() => {
                settling.pop_front();
                Wake::Settled(settled(joined))
            }
            Some(events) = inbox.recv(),
                if failures == 0
                    && settling.len() < SETTLING_BATCHES
                    && !conn.status().blocked() => {
                Wake::Direct(events)
            }
            () = ready.notified(), if failures == 0 => Wake::Sweep,
            () = tokio::time::sleep_until(sweep_at) => Wake::Sweep,
        };
        let mut settled_broker_error = false;
        let outcome = match wake {
            Wake::Direct(mut events) => {
                // Whatever else is waiting, in one go (up to a few sweeps' worth).
                while events.len() < 4 * BATCH as usize {
                    match inbox.try_recv() {
                        Ok(more) => events.extend(more),
                        Err(_) => break,
                    }
                }
                let deadline = tokio::time::Instant::now() + options.confirm_timeout;
                match send(&channel, events, deadline).await {
                    Ok(confirms) => {
                        let (db, relay_id) = (db.clone(), relay_id.to_owned());
                        settling.push_back(tokio::spawn(async move {
                            settle(&db, &relay_id, confirms, deadline, "direct").await
                        }));
                        Ok(())
                    }
                    Err(e) => Err(e),
                }
            }
            Wake::Settled(outcome) => {
                settled_broker_error = matches!(outcome, Err(RelayError::Broker(_)));
                outcome.map(drop)
            }
            Wake::Sweep => {
                let swept = sweep(&db, &channel, relay_id, conn, options).await;
                sweep_at = tokio::time::Instant::now() + options.poll;
                swept
            }
        };
        let mut broken = None;
        match outcome {
            Ok(()) => failures = 0,
            // A batch published on a channel that has since been replaced (or that failed
            // while it settled, and the next publish will tell): nothing to reopen.
            Err(RelayError::Broker(e))
                if settled_broker_error
                    && conn.status().connected()
                    && channel.status().connected() =>
            {
                failures += 1;
                tracing::warn!(error = %e, failures, "outbox relay: a batch failed to settle");
                metrics::counter!("upline_outbox_relay_failures_total", "reason" => "broker")
                    .increment(1);
            }
            Err(RelayError::Broker(e)) => broken = Some(e),
            Err(e) => {
                failures += 1;
                tracing::warn!(error = %e, failures, "outbox relay: attempt failed; backing off");
                metrics::counter!("upline_outbox_relay_failures_total", "reason" => reason(&e))
                    .increment(1);
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
        let now = tokio::time::Instant::now();
        if conn.status().blocked() {
            sweep_at = sweep_at.min(now + BLOCKED_POLL);
        } else if failures > 0 {
            sweep_at =
                now + (Duration::from_millis(100) * 2u32.pow(failures.min(6))).min(MAX_BACKOFF);
        }
    };
    // Let the batches in flight settle (each within its confirm deadline), so that their
    // rows are deleted rather than left to a lease.
    for handle in settling {
        if let Err(e) = settled(handle.await) {
            tracing::warn!(error = %e, "outbox relay: a batch did not settle; its rows stay queued");
        }
    }
    if result.is_ok() && !conn.status().blocked() {
        // Publish what the last in-flight purchases committed before stopping (the worker
        // stops its relay after its consumers).
        let mut events = Vec::new();
        while let Ok(more) = inbox.try_recv() {
            events.extend(more);
        }
        let last = match publish(&db, &channel, relay_id, events, options, "direct").await {
            Ok(_) => sweep(&db, &channel, relay_id, conn, options).await,
            Err(e) => Err(e),
        };
        if let Err(e) = last {
            tracing::warn!(error = %e, "outbox relay: last sweep failed; the rows stay queued");
        }
    }
    // Hand back whatever this relay still holds, so the next relay need not wait for the lease.
    if let Err(e) = release_all(&db, relay_id).await {
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

/// Relays batches of rows nobody holds until one comes back short or the broker blocks.
async fn sweep(
    db: &PgPool,
    channel: &Channel,
    relay_id: &str,
    conn: &Connection,
    options: RelayOptions,
) -> Result<(), RelayError> {
    while !conn.status().blocked() {
        if relay_batch(db, channel, relay_id, options).await? < BATCH as usize {
            break;
        }
    }
    Ok(())
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
        RelayError::Settling(_) => "settling",
    }
}

/// A settling task's outcome, its panic as [`RelayError::Settling`].
fn settled(
    joined: Result<Result<usize, RelayError>, tokio::task::JoinError>,
) -> Result<usize, RelayError> {
    joined.unwrap_or_else(|e| Err(RelayError::Settling(e.to_string())))
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
    let events = rows.into_iter().map(EarningEvent::from).collect();
    publish(db, channel, relay_id, events, options, "sweep").await
}

/// Publishes `events` (their outbox rows held by `relay_id`) and awaits the confirms within
/// `options.confirm_timeout`, then deletes the confirmed rows and releases the refused ones;
/// returns how many events there were. `path` labels the published counter.
async fn publish(
    db: &PgPool,
    channel: &Channel,
    relay_id: &str,
    events: Vec<EarningEvent>,
    options: RelayOptions,
    path: &'static str,
) -> Result<usize, RelayError> {
    if events.is_empty() {
        return Ok(0);
    }
    let deadline = tokio::time::Instant::now() + options.confirm_timeout;
    let confirms = send(channel, events, deadline).await?;
    settle(db, relay_id, confirms, deadline, path).await
}

/// Publishes `events` on `channel` by `deadline`, without waiting for their confirms; returns
/// each event's earning id with its pending confirm, in publishing order.
///
/// The whole batch is queued before any of it is awaited. lapin's `basic_publish` queues its
/// frames for the connection's I/O thread and takes the next delivery tag when it is first
/// polled, then waits until the frames are written. Awaiting one publish after another made
/// the I/O thread wake, write one message in one `sendto` and sleep again for every event: a
/// quarter of the worker's CPU in the 1-worker drain (docs/perf.md, "The relay's batch in one
/// write"). Each publish is polled once, in order, so the frames still go out in the order of
/// `events` (each earner's `seq` order); the I/O thread then writes many in one system call.
///
/// # Errors
/// [`RelayError::Timeout`] when publishing did not finish by `deadline` (publishing waits
/// while the connection is blocked); [`RelayError::Broker`] when the channel failed.
async fn send(
    channel: &Channel,
    events: Vec<EarningEvent>,
    deadline: tokio::time::Instant,
) -> Result<Vec<(i64, PublisherConfirm)>, RelayError> {
    let claimed = events.len();
    let messages: Vec<(i64, String, Vec<u8>)> = events
        .iter()
        .map(|event| {
            let body = serde_json::to_vec(event).expect("an EarningEvent always serialises");
            (event.earning_id, event.routing_key(), body)
        })
        .collect();
    let published = tokio::time::timeout_at(deadline, async {
        let mut publishes = Vec::with_capacity(messages.len());
        for (_, routing_key, body) in &messages {
            let mut publish = Box::pin(future::maybe_done(channel.basic_publish(
                amqp::EARNINGS_EXCHANGE,
                routing_key,
                BasicPublishOptions::default(),
                body,
                amqp::persistent_json(),
            )));
            // The first poll queues the frames; the write is awaited below, with the rest.
            std::future::poll_fn(|cx| {
                let _ = publish.as_mut().poll(cx);
                Poll::Ready(())
            })
            .await;
            publishes.push(publish);
        }
        let mut confirms: Vec<(i64, PublisherConfirm)> = Vec::with_capacity(messages.len());
        for ((earning_id, _, _), mut publish) in messages.iter().zip(publishes) {
            publish.as_mut().await;
            let confirm = publish
                .as_mut()
                .take_output()
                .expect("a finished publish holds its result")?;
            confirms.push((*earning_id, confirm));
        }
        Ok::<_, lapin::Error>(confirms)
    })
    .await;
    match published {
        Err(_elapsed) => Err(RelayError::Timeout(claimed)),
        Ok(Err(e)) => Err(RelayError::Broker(e)),
        Ok(Ok(confirms)) => Ok(confirms),
    }
}

/// Awaits `confirms` until `deadline`, then deletes the confirmed rows and releases the
/// refused ones (held by `relay_id`); returns how many events there were. Rows whose confirm
/// did not come keep their lease until it expires. `path` labels the published counter.
async fn settle(
    db: &PgPool,
    relay_id: &str,
    confirms: Vec<(i64, PublisherConfirm)>,
    deadline: tokio::time::Instant,
    path: &'static str,
) -> Result<usize, RelayError> {
    let claimed = confirms.len();
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
        metrics::counter!("upline_earning_events_published_total", "path" => path)
            .increment(confirmed.len() as u64);
    }
    if !refused.is_empty() {
        release(db, relay_id, &refused).await?;
        outcome = outcome.and(Err(RelayError::Refused(refused.len())));
    }
    outcome.map(|()| claimed)
}

/// Leases up to [`BATCH`] rows nobody holds, oldest first, in one committed statement; returns
/// their earnings. Public for the tests, which check the bound under every plan the planner
/// may pick.
///
/// # Errors
/// Database errors; nothing is leased.
pub async fn claim(db: &PgPool, relay_id: &str, lease: Duration) -> sqlx::Result<Vec<EarningRow>> {
    sqlx::query_as!(
        EarningRow,
        r#"with claimed as (
               update earning_outbox
               set claimed_by = $2, claimed_until = now() + make_interval(secs => $3)
               -- An array, evaluated once: with `in (select … limit … skip locked)` a
               -- nested-loop plan re-runs the subquery per row and leases the whole table.
               where earning_id = any(array(
                   select earning_id from earning_outbox
                   where claimed_until is null or claimed_until < now()
                   order by earning_id limit $1 for update skip locked
               ))
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
    // Forgetting a delete in a crash only means publishing again (at least once, duplicates are
    // dropped by seq downstream), so this transaction need not wait for its WAL flush. The
    // setting goes with `BEGIN`, in one round trip.
    let mut tx = db
        .begin_with("begin; set local synchronous_commit = off")
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
