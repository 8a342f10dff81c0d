//! Consumes `upline.earnings` through this notifier's own exclusive, auto-deleting queue (so
//! every notifier receives every event) and hands each event to the hub. After a reconnect
//! the hub is told to resync, so that subscribers catch up on what was published meanwhile.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicQosOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use upline_common::amqp;
use upline_common::config::AmqpSettings;

use crate::hub::{Frame, Hub};

/// The fields of an earning event the hub routes by.
#[derive(Deserialize)]
struct Routing {
    earning_id: i64,
    earner_id: i64,
    seq: i64,
}

/// Runs until `cancel` fires, reconnecting with backoff whenever the broker goes away.
pub async fn run(
    amqp: AmqpSettings,
    hub: Arc<Hub>,
    broker_up: Arc<AtomicBool>,
    cancel: CancellationToken,
) {
    let mut first = true;
    while let Some(conn) = amqp::connect_with_retry(&amqp, "upline-notifier", &cancel).await {
        if !first {
            hub.resync();
        }
        first = false;
        if let Err(e) = consume(&conn, &hub, &broker_up, &cancel).await {
            tracing::warn!(error = %e, "earnings consumer stopped; reconnecting");
        }
        broker_up.store(false, Ordering::Relaxed);
        let _ = conn.close(200, "notifier consumer over").await;
        if cancel.is_cancelled() {
            break;
        }
        // Events published while disconnected are recovered from PostgreSQL by the resync.
    }
}

async fn consume(
    conn: &lapin::Connection,
    hub: &Hub,
    broker_up: &AtomicBool,
    cancel: &CancellationToken,
) -> anyhow::Result<()> {
    let channel = conn.create_channel().await?;
    amqp::declare_topology(&channel).await?;
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
        match (
            serde_json::from_slice::<Routing>(&delivery.data),
            String::from_utf8(delivery.data),
        ) {
            (Ok(r), Ok(json)) => {
                hub.publish(Frame::from_json(r.earner_id, r.seq, r.earning_id, json))
            }
            _ => tracing::warn!("ignoring an earning event that is not valid JSON"),
        }
    }
}
