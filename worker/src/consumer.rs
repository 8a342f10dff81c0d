//! The lapin side of the worker: consume `upline.purchases` with manual acknowledgements,
//! acknowledge only after the ledger committed, dead-letter what can never be processed with
//! `x-upline-error`, and never let one bad message end the loop.

use std::time::Duration;

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use tokio_util::sync::CancellationToken;
use upline_common::amqp;

use crate::process::{process, Ctx, Disposition};

/// Runs one consumer on its own channel until `cancel` fires or the channel fails.
/// On cancel, the message in hand is finished first; prefetched ones go back to the queue
/// when the channel closes.
///
/// # Errors
/// Broker errors (the caller reconnects).
pub async fn consume(
    ctx: Ctx,
    conn: &Connection,
    prefetch: u16,
    tag: String,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let channel = conn.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let mut consumer = channel
        .basic_consume(
            amqp::PURCHASES_QUEUE,
            &tag,
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    tracing::debug!(%tag, prefetch, "consuming purchases");
    let result = loop {
        let delivery = tokio::select! {
            () = cancel.cancelled() => break Ok(()),
            next = consumer.next() => next,
        };
        match delivery {
            Some(Ok(delivery)) => {
                if let Err(e) = handle(&ctx, &channel, delivery, &cancel).await {
                    break Err(e);
                }
            }
            Some(Err(e)) => break Err(e.into()),
            None => break Err(anyhow::anyhow!("the broker cancelled consumer {tag}")),
        }
    };
    if channel.status().connected() {
        let _ = channel
            .basic_cancel(&tag, BasicCancelOptions::default())
            .await;
        let _ = channel.close(200, "worker stopping").await;
    }
    result
}

/// Processes one delivery to its end: ack after commit, dead-letter, or (on shutdown during a
/// database outage) leave it for redelivery.
async fn handle(
    ctx: &Ctx,
    channel: &Channel,
    delivery: Delivery,
    cancel: &CancellationToken,
) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let mut attempt = 0u32;
    let disposition = loop {
        // A panic in processing is caught here (the task fails alone) and dead-letters the
        // message rather than killing the consumer.
        let task = {
            let ctx = ctx.clone();
            let body = delivery.data.clone();
            tokio::spawn(async move { process(&ctx, &body).await })
        };
        match task.await {
            Ok(Ok(d)) => break d,
            Ok(Err(e))
                if upline_common::db::is_transient(&e)
                    || matches!(e, sqlx::Error::PoolTimedOut) =>
            {
                attempt += 1;
                let wait = Duration::from_millis(100 * 2u64.pow(attempt.min(6)));
                tracing::warn!(error = %e, attempt, retry_in = ?wait, "database unavailable; retrying purchase");
                tokio::select! {
                    () = cancel.cancelled() => {
                        delivery.nack(BasicNackOptions { requeue: true, ..Default::default() }).await?;
                        return Ok(());
                    }
                    () = tokio::time::sleep(wait) => continue,
                }
            }
            Ok(Err(e)) => {
                // A non-transient database error is a bug or a schema problem: keep the
                // message for inspection rather than loop on it.
                tracing::error!(error = %e, "purchase could not be recorded");
                break Disposition::DeadLetter(format!("database error: {e}"));
            }
            Err(join) => {
                tracing::error!(error = %join, "processing panicked");
                break Disposition::DeadLetter(
                    "worker panicked while processing this message".into(),
                );
            }
        }
    };
    if let Disposition::DeadLetter(reason) = &disposition {
        tracing::warn!(%reason, "dead-lettering purchase message");
        let props = amqp::with_error_header(&delivery.properties, reason);
        let confirm = channel
            .basic_publish(
                amqp::PURCHASES_DLX,
                "",
                BasicPublishOptions::default(),
                &delivery.data,
                props,
            )
            .await?
            .await?;
        if !confirm.is_ack() {
            anyhow::bail!("the broker refused the dead-lettered copy");
        }
        metrics::counter!("upline_purchases_total", "result" => "dead_lettered").increment(1);
    }
    delivery.ack(BasicAckOptions::default()).await?;
    metrics::histogram!("upline_purchase_processing_seconds")
        .record(started.elapsed().as_secs_f64());
    Ok(())
}
