//! upline-webhooks: signs and delivers webhooks to the endpoints an admin registers with
//! `/api/webhooks` (contract §11), following the Standard Webhooks specification.
//!
//! A service of its own rather than a part of the worker, because:
//! - **it talks to the outside**: it is the one process that opens connections to addresses
//!   users chose, so it can run where outbound traffic is allowed and the ledger's workers
//!   cannot, and its failures (DNS, TLS, slow or dead receivers) stay out of their runtime;
//! - **it scales with endpoints, not purchases**: thousands of slow receivers need many open
//!   requests and little CPU, the ledger the opposite;
//! - **the ledger never waits for it**: it reads copies of the broker's events from queues of
//!   its own ([`intake`]) and writes only its own tables, so a slow or dead endpoint cannot
//!   slow a purchase. Any number may run side by side; deliveries are claimed
//!   `for update skip locked` ([`dispatch`]).

pub mod dispatch;
pub mod intake;
pub mod signing;
pub mod store;

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

/// How often old messages are swept (`webhooks.retention`).
const SWEEP_EVERY: Duration = Duration::from_secs(3600);

/// Runs a webhooks service until `shutdown` fires: the health/metrics server on `listener`,
/// the dispatcher, the retention sweep and the two intake consumers, reconnecting to RabbitMQ
/// whenever the connection is lost.
///
/// # Errors
/// Invalid settings, or a database that cannot be migrated.
pub async fn run(
    settings: Settings,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let db = upline_common::db::connect_and_migrate(&settings.database, &shutdown).await?;
    let probes = Probes::new(db.clone());
    let queued = Arc::new(Notify::new());
    let dispatcher = Arc::new(dispatch::Dispatcher::new(
        db.clone(),
        &settings.webhooks,
        queued.clone(),
    )?);

    let app = upline_common::http::ops_routes::<()>(probes.clone());
    let http_shutdown = shutdown.clone();
    let http = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(http_shutdown.cancelled_owned())
            .await
    });
    let dispatching = tokio::spawn(dispatcher.run(shutdown.clone()));
    let sweeping = tokio::spawn(sweep(
        db.clone(),
        settings.webhooks.retention,
        shutdown.clone(),
    ));
    if settings.webhooks.allow_private_targets {
        tracing::warn!("webhooks.allow_private_targets is on: endpoints may point at loopback and private addresses (no SSRF protection)");
    }
    tracing::info!("webhooks service starting");

    let intake = intake::Intake {
        db,
        queued,
        prefetch: settings.webhooks.prefetch,
        max_message_bytes: settings.worker.max_message_bytes,
    };
    let fallback_noted = std::sync::atomic::AtomicBool::new(false);
    while !shutdown.is_cancelled() {
        let Some(conn) =
            amqp::connect_with_retry(&settings.amqp, "upline-webhooks", &shutdown).await
        else {
            break;
        };
        let conn = Arc::new(conn);
        let result = session(&intake, &conn, &probes, &fallback_noted, &shutdown).await;
        probes.broker_up.store(false, Ordering::Relaxed);
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            conn.close(200, "webhooks session over"),
        )
        .await;
        match result {
            Ok(()) => break,
            Err(e) => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "broker session failed; reconnecting"
                );
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }
    dispatching.await.context("dispatcher task")?;
    sweeping.await.context("retention task")?;
    http.await
        .context("health server task")?
        .context("health server")?;
    tracing::info!("webhooks service stopped");
    Ok(())
}

/// One broker connection: the topology and both consumers, until `shutdown` (`Ok`) or either
/// consumer fails (`Err`).
async fn session(
    intake: &intake::Intake,
    conn: &Arc<lapin::Connection>,
    probes: &Probes,
    fallback_noted: &std::sync::atomic::AtomicBool,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let channel = amqp::declare_topology_if_allowed(
        conn,
        &[amqp::PURCHASES_EXCHANGE, amqp::EARNINGS_EXCHANGE],
        fallback_noted,
    )
    .await
    .context("declaring the topology")?;
    amqp::declare_webhook_queues(&channel)
        .await
        .context("declaring the webhooks queues")?;
    let _ = channel.close(200, "topology declared").await;
    probes.broker_up.store(true, Ordering::Relaxed);

    let session = shutdown.child_token();
    let mut tasks = JoinSet::new();
    {
        let (intake, conn, cancel) = (intake.clone(), conn.clone(), session.clone());
        tasks.spawn(async move { intake::earnings(intake, &conn, cancel).await });
    }
    {
        let (intake, conn, cancel) = (intake.clone(), conn.clone(), session.clone());
        tasks.spawn(async move { intake::purchases(intake, &conn, cancel).await });
    }
    let mut first_error = None;
    while let Some(joined) = tasks.join_next().await {
        if let Err(e) = joined.map_err(anyhow::Error::from).and_then(|r| r) {
            session.cancel();
            first_error.get_or_insert(e);
        }
    }
    match first_error {
        Some(e) if !shutdown.is_cancelled() => Err(e),
        _ => Ok(()),
    }
}

/// Deletes what `webhooks.retention` no longer keeps, every hour and at start-up.
async fn sweep(db: sqlx::PgPool, retention: Duration, cancel: CancellationToken) {
    loop {
        match store::sweep(&db, retention).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(messages = n, "old webhook messages deleted"),
            Err(e) => tracing::warn!(error = %e, "webhook retention sweep failed"),
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(SWEEP_EVERY) => {}
        }
    }
}
