//! upline-worker: consumes purchases and refunds from `upline.purchases`, records each purchase
//! and its commissions, and each refund and its clawbacks, exactly once in PostgreSQL; approves
//! held commissions on a schedule; and publishes one earning event per ledger entry to
//! `upline.earnings` through a transactional outbox (contract §1, §3, §4, §10).
//! Any number of workers may run side by side on the same queue.

pub mod circuit;
pub mod consumer;
pub mod leaderboard;
pub mod ledger;
pub mod outbox;
pub mod process;
pub mod retention;
pub mod schedule;
pub mod standby;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use upline_common::http::Probes;
use upline_common::{amqp, Settings};

use crate::process::Ctx;

/// How long the consumers may take to stop once the session ends (shutdown or a failed part)
/// before they are abandoned.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Runs a worker until `shutdown` fires: the health/metrics server on `listener`, the
/// consumers and the outbox relay, reconnecting to RabbitMQ whenever the connection is lost.
///
/// # Errors
/// Invalid settings or a database that cannot be migrated.
pub async fn run(
    settings: Settings,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let rules = Arc::new(settings.commission.rules()?);
    // A batch that fails on a connection the server dropped is retried, so the worker's
    // checkouts skip the ping of a connection in steady use (one round trip less a batch).
    let db = upline_common::db::connect_and_migrate_with(
        &settings.database,
        &shutdown,
        upline_common::db::Checkout::PingWhenIdle,
    )
    .await?;
    let probes = Probes::new(db.clone());
    let ctx = Ctx {
        db,
        rules,
        outbox_ready: Arc::new(Notify::new()),
        direct: outbox::Direct::new(relay_options(&settings)),
        circuit: Arc::new(circuit::Circuit::new(probes.database_writable.clone())),
        max_message_bytes: settings.worker.max_message_bytes,
        gate: None,
    };

    let app = upline_common::http::ops_routes::<()>(probes.clone());
    let http_shutdown = shutdown.clone();
    let http = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(http_shutdown.cancelled_owned())
            .await
    });
    let schedule = tokio::spawn(schedule::run(
        ctx.clone(),
        Duration::from_secs(settings.worker.lifecycle_interval_secs),
        shutdown.clone(),
    ));
    let leaderboard = tokio::spawn(leaderboard::run(
        ctx.db.clone(),
        Duration::from_millis(settings.worker.leaderboard_refresh_ms),
        shutdown.clone(),
    ));
    let retention = tokio::spawn(retention::run(
        ctx.db.clone(),
        settings.privacy.raw_body_retention,
        shutdown.clone(),
    ));

    // Shown from the start, so that a standby's /metrics reads 0 rather than nothing.
    metrics::gauge!("upline_consumer_slots_held").set(0.0);
    tracing::info!(
        consumers = settings.worker.consumers,
        prefetch = settings.worker.prefetch,
        "worker starting"
    );
    while !shutdown.is_cancelled() {
        let Some(conn) = amqp::connect_with_retry(&settings.amqp, "upline-worker", &shutdown).await
        else {
            break;
        };
        probes.broker_up.store(true, Ordering::Relaxed);
        let conn = Arc::new(conn);
        let result = session(&ctx, &settings, &conn, &probes, &shutdown).await;
        probes.broker_up.store(false, Ordering::Relaxed);
        probes.broker_blocked.store(false, Ordering::Relaxed);
        // Closing waits for the broker too, which a blocked connection never reaches: then the
        // connection is just dropped.
        if !conn.status().blocked() {
            let _ = tokio::time::timeout(
                Duration::from_secs(2),
                conn.close(200, "worker session over"),
            )
            .await;
        }
        match result {
            Ok(()) => break,
            Err(e) => tracing::warn!(
                error = format!("{e:#}"),
                "broker session failed; reconnecting"
            ),
        }
    }
    http.await
        .context("health server task")?
        .context("health server")?;
    retention.await.context("raw body retention task")?;
    leaderboard.await.context("leaderboard refresh task")?;
    schedule.await.context("commission lifecycle schedule")?;
    tracing::info!("worker stopped");
    Ok(())
}

/// One broker connection's worth of work: topology, consumers, relay, and a watch on
/// `connection.blocked` for `/readyz`. Ends when `shutdown` fires (`Ok`) or any part fails
/// (`Err`, after stopping the others).
async fn session(
    ctx: &Ctx,
    settings: &Settings,
    conn: &Arc<lapin::Connection>,
    probes: &Probes,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    amqp::declare_topology(conn)
        .await
        .context("declaring the topology")?;

    let session = shutdown.child_token();
    let mut tasks = JoinSet::new();
    let standby = settings
        .worker
        .standby
        .then(|| Duration::from_millis(settings.worker.standby_poll_ms));
    for i in 0..settings.worker.consumers {
        let (mut ctx, conn, cancel) = (ctx.clone(), conn.clone(), session.clone());
        ctx.gate = Some(ledger::Gate::for_consumer(
            i,
            settings.worker.ledger_writers,
        ));
        let options = consumer::ConsumerOptions {
            prefetch: settings.worker.prefetch,
            batch_size: settings.worker.batch_size,
            priority: consumer::ConsumerOptions::priority_of(i, settings.worker.consumers),
        };
        let tag = format!("upline-worker-{}-{i}", std::process::id());
        tasks.spawn(async move {
            consumer::consume_in_turn(ctx, &conn, options, (tag, i), standby, cancel).await
        });
    }
    // The relay stops only after the consumers: its last sweep then publishes what their last
    // batches committed, instead of leaving it to the next worker.
    let relay_stop = CancellationToken::new();
    let mut relay = {
        let (db, conn, direct, ready, cancel) = (
            ctx.db.clone(),
            conn.clone(),
            ctx.direct.clone(),
            ctx.outbox_ready.clone(),
            relay_stop.clone(),
        );
        let options = relay_options(settings);
        tokio::spawn(async move { outbox::relay(db, &conn, &direct, ready, options, cancel).await })
    };
    // lapin records `connection.blocked`/`unblocked` in the connection's status (and holds
    // every outgoing frame meanwhile) but offers no callback: look at it a few times a second.
    let watch = {
        let (conn, blocked, cancel) =
            (conn.clone(), probes.broker_blocked.clone(), session.clone());
        tokio::spawn(async move {
            loop {
                let now = conn.status().blocked();
                if blocked.swap(now, Ordering::Relaxed) != now {
                    if now {
                        tracing::warn!("RabbitMQ blocked this connection (resource alarm); nothing can be published until it clears");
                    } else {
                        tracing::info!("RabbitMQ unblocked this connection");
                    }
                    metrics::gauge!("upline_broker_blocked").set(if now { 1.0 } else { 0.0 });
                }
                tokio::select! {
                    () = cancel.cancelled() => break,
                    () = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
            }
        })
    };
    // The depth of the dead-letter queue, for /metrics and a warning; not a part of the
    // session's work, so it is simply stopped with it.
    let dead_letters = {
        let (conn, cancel, alert) = (
            conn.clone(),
            session.clone(),
            settings.worker.dead_letter_alert,
        );
        tokio::spawn(async move {
            if let Err(e) = watch_dead_letters(&conn, alert, cancel).await {
                tracing::debug!(error = %e, "dead-letter watch stopped");
            }
        })
    };
    let mut first_error = None;
    let mut relay_ended = false;
    // A consumer finishes its batch in hand when the session ends, but acknowledging it waits
    // for the broker, and a blocked connection (resource alarm) sends nothing: past the grace
    // period the consumers are abandoned. Their batches are committed; the unacknowledged
    // deliveries go back to the queue with the connection and are recorded as duplicates.
    let overdue = async {
        session.cancelled().await;
        tokio::time::sleep(STOP_GRACE).await;
    };
    tokio::pin!(overdue);
    let mut abandoned = false;
    loop {
        let result = tokio::select! {
            joined = tasks.join_next() => match joined {
                Some(joined) => joined,
                None => break,
            },
            joined = &mut relay, if !relay_ended => {
                relay_ended = true;
                joined
            }
            () = &mut overdue, if !abandoned => {
                abandoned = true;
                tracing::warn!(
                    grace = ?STOP_GRACE,
                    blocked = conn.status().blocked(),
                    "consumers did not stop in time; abandoning their unacknowledged deliveries \
                     (the broker redelivers them)"
                );
                tasks.abort_all();
                continue;
            }
        };
        if abandoned && matches!(&result, Err(e) if e.is_cancelled()) {
            continue;
        }
        if let Err(e) = result.map_err(anyhow::Error::from).and_then(|r| r) {
            session.cancel();
            first_error.get_or_insert(e);
        }
    }
    relay_stop.cancel();
    if !relay_ended {
        if let Err(e) = relay.await.map_err(anyhow::Error::from).and_then(|r| r) {
            first_error.get_or_insert(e);
        }
    }
    session.cancel();
    let _ = watch.await;
    dead_letters.abort();
    metrics::gauge!("upline_broker_blocked").set(0.0);
    match first_error {
        Some(e) if !shutdown.is_cancelled() => Err(e),
        _ => Ok(()),
    }
}

/// The relay's settings: `worker.outbox_poll_ms`, `worker.outbox_confirm_timeout_ms`.
fn relay_options(settings: &Settings) -> outbox::RelayOptions {
    outbox::RelayOptions {
        poll: Duration::from_millis(settings.worker.outbox_poll_ms),
        confirm_timeout: Duration::from_millis(settings.worker.outbox_confirm_timeout_ms),
    }
}

/// Publishes the depth of `upline.purchases.dead` as the gauge `upline_dead_letters` every
/// 10 s, and warns while it is above `alert` (`worker.dead_letter_alert`): dead letters wait
/// for an operator (`upline dlq`), so a growing queue must be seen.
///
/// # Errors
/// Broker errors (the session reconnects).
async fn watch_dead_letters(
    conn: &lapin::Connection,
    alert: u32,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let channel = conn.create_channel().await?;
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    loop {
        tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        let depth = amqp::queue_depth(&channel, amqp::PURCHASES_DEAD_QUEUE).await?;
        metrics::gauge!("upline_dead_letters").set(f64::from(depth));
        if depth > alert {
            tracing::warn!(
                depth,
                alert,
                "dead-lettered purchases are piling up in upline.purchases.dead; inspect and replay them with `upline dlq`"
            );
        }
    }
}
