//! Consumes `upline.earnings` through this notifier's own exclusive, auto-deleting queue (so
//! every notifier receives every event) and hands each event to the hub. After a reconnect
//! the hub is told to resync, so that subscribers catch up on what was published meanwhile.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicQosOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;
use upline_common::amqp;
use upline_common::config::AmqpSettings;

use crate::hub::{Frame, Hub};

/// The fields of an earning event the hub routes by.
#[derive(Deserialize)]
struct Routing {
    earning_id: i64,
    earner_id: upline_common::UserId,
    seq: i64,
}

/// Runs until `cancel` fires, reconnecting with backoff whenever the broker goes away, or
/// until `upline.earnings` exists (a least-privilege notifier user cannot declare it: the
/// worker does).
pub async fn run(
    amqp: AmqpSettings,
    hub: Arc<Hub>,
    broker_up: Arc<AtomicBool>,
    cancel: CancellationToken,
) {
    let mut first = true;
    let fallback_noted = AtomicBool::new(false);
    // Sessions in a row that ended before consuming (e.g. no topology yet).
    let mut failed_in_a_row = 0u32;
    while let Some(conn) = amqp::connect_with_retry(&amqp, "upline-notifier", &cancel).await {
        if !first {
            hub.resync();
        }
        first = false;
        let result = consume(&conn, &hub, &broker_up, &fallback_noted, &cancel).await;
        let was_consuming = broker_up.swap(false, Ordering::Relaxed);
        failed_in_a_row = if was_consuming {
            0
        } else {
            failed_in_a_row.saturating_add(1)
        };
        if let Err(e) = result {
            if failed_in_a_row <= 1 {
                tracing::warn!(error = %e, "earnings consumer stopped; reconnecting");
            } else {
                tracing::debug!(error = %e, "earnings consumer still cannot start; retrying");
            }
        }
        let _ = conn.close(200, "notifier consumer over").await;
        if cancel.is_cancelled() {
            break;
        }
        // Events published while disconnected are recovered from PostgreSQL by the resync.
        // A broker that is up but not ready is retried with backoff, not in a busy loop.
        if failed_in_a_row > 0 {
            let wait = Duration::from_millis(100 << failed_in_a_row.min(6)).min(MAX_RETRY);
            tokio::select! {
                () = cancel.cancelled() => break,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }
}

/// Longest wait between attempts while the broker is up but the consumer cannot start.
const MAX_RETRY: Duration = Duration::from_secs(5);

async fn consume(
    conn: &lapin::Connection,
    hub: &Hub,
    broker_up: &AtomicBool,
    fallback_noted: &AtomicBool,
    cancel: &CancellationToken,
) -> anyhow::Result<()> {
    // Declares the topology if this user may, else checks that upline.earnings exists.
    let channel =
        amqp::declare_topology_if_allowed(conn, &[amqp::EARNINGS_EXCHANGE], fallback_noted).await?;
    channel.basic_qos(1000, BasicQosOptions::default()).await?;
    let queue = channel
        .queue_declare(
            "",
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_bind(
            queue.name().as_str(),
            amqp::EARNINGS_EXCHANGE,
            "earning.#",
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    // Resync once bound: anything committed before the binding existed is read from the
    // database by subscriptions that ask for it.
    hub.resync();
    let mut consumer = channel
        .basic_consume(
            queue.name().as_str(),
            "upline-notifier",
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    tracing::info!(queue = queue.name().as_str(), "notifier consuming earnings");
    // Ready only once bound and consuming: from here no published event is missed.
    broker_up.store(true, Ordering::Relaxed);
    loop {
        let delivery = tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            next = consumer.next() => next,
        };
        let delivery = match delivery {
            Some(Ok(d)) => d,
            Some(Err(e)) => return Err(e.into()),
            None => anyhow::bail!("consumer cancelled by the broker"),
        };
        // The event's own bytes are forwarded: it is serialised once, by the worker.
        let event = serde_json::from_slice::<Box<RawValue>>(&delivery.data)
            .and_then(|json| Ok((serde_json::from_str::<Routing>(json.get())?, json)));
        match event {
            Ok((r, json)) => hub.publish(Frame::from_json(r.earner_id, r.seq, r.earning_id, json)),
            Err(_) => tracing::warn!("ignoring an earning event that is not valid JSON"),
        }
    }
}
