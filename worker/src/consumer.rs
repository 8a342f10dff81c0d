//! The lapin side of the worker: consume `upline.purchases` with manual acknowledgements, take
//! whatever deliveries are ready (up to `worker.batch_size`) as one batch, record the batch in
//! one transaction, and acknowledge it with one `multiple` ack only after the commit.
//! Unreadable messages are dead-lettered with `x-upline-error`. A database that is down,
//! failing over or not migrated yet stops the consumers (a circuit, [`crate::circuit`]) and
//! never dead-letters anything; a batch that fails because of its content is retried message
//! by message, so one poison message never holds up the rest, and never ends the loop.

use std::time::Duration;

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection};
use tokio_util::sync::CancellationToken;
use upline_common::amqp;
use upline_common::db::{classify, ErrorClass};

use crate::process::{process_batch, Ctx, Disposition, Message};
use crate::standby::ConsumerSlot;

/// How one consumer takes work from the queue.
#[derive(Debug, Clone, Copy)]
pub struct ConsumerOptions {
    /// Unacknowledged deliveries the broker may hand this consumer.
    pub prefetch: u16,
    /// Most deliveries recorded in one transaction.
    pub batch_size: usize,
    /// The consumer's priority on the queue (RabbitMQ's `x-priority` consumer argument): the
    /// broker hands a delivery to a lower-priority consumer only while every higher-priority
    /// one has its prefetch full. See [`ConsumerOptions::priority_of`].
    pub priority: i32,
}

impl ConsumerOptions {
    /// The priority of consumer number `consumer` (0, 1, …) of a worker with `consumers`:
    /// `consumers - 1 - consumer`, so the first takes all the work until its prefetch is
    /// full, the second only what overflows from it, and so on. Under light load one consumer
    /// then takes every purchase and its batches are not split between two transactions
    /// (each with a transaction's fixed cost); under a backlog the first one's prefetch fills
    /// and all of them write (docs/perf.md, "One consumer until there is a backlog").
    pub fn priority_of(consumer: u16, consumers: u16) -> i32 {
        i32::from(consumers.saturating_sub(1).saturating_sub(consumer))
    }
}

/// Runs consumer number `number` of its worker for as long as `cancel` allows. With
/// `standby` (`worker.standby`, polling every `worker.standby_poll_ms`) it takes turns with the
/// other workers' consumers of the same number: it stands by until it holds consumer slot
/// `number` ([`ConsumerSlot`]), consumes while it holds it, and stands by again if it loses
/// it. Without, it simply consumes.
///
/// # Errors
/// Broker errors (the caller reconnects).
pub async fn consume_in_turn(
    ctx: Ctx,
    conn: &Connection,
    options: ConsumerOptions,
    (tag, number): (String, u16),
    standby: Option<Duration>,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let Some(poll) = standby else {
        return consume(ctx, conn, options, tag, cancel.clone(), cancel).await;
    };
    loop {
        let Some(mut slot) = ConsumerSlot::take(&ctx.db, number, poll, &cancel).await else {
            return Ok(());
        };
        tracing::info!(%tag, slot = slot.number(), "holding the consumer slot; consuming purchases");
        let stop = cancel.child_token();
        let consuming = consume(
            ctx.clone(),
            conn,
            options,
            tag.clone(),
            stop.clone(),
            cancel.clone(),
        );
        tokio::pin!(consuming);
        let result = tokio::select! {
            r = &mut consuming => r,
            () = slot.lost(poll) => {
                stop.cancel();
                consuming.await
            }
        };
        slot.release().await;
        result?;
        if cancel.is_cancelled() {
            return Ok(());
        }
        tracing::warn!(%tag, slot = number, "consumer slot lost; standing by");
    }
}

/// Runs one consumer on its own channel until `stop` fires or the channel fails.
/// On stop, the batch in hand is finished first: retried while the database is unavailable
/// unless `cancel` (shutdown) fires too. Prefetched deliveries go back to the queue when the
/// channel closes.
///
/// # Errors
/// Broker errors (the caller reconnects).
async fn consume(
    ctx: Ctx,
    conn: &Connection,
    options: ConsumerOptions,
    tag: String,
    stop: CancellationToken,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let channel = conn.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    channel
        .basic_qos(options.prefetch, BasicQosOptions::default())
        .await?;
    let mut arguments = FieldTable::default();
    arguments.insert("x-priority".into(), AMQPValue::LongInt(options.priority));
    let consumer = channel
        .basic_consume(
            amqp::PURCHASES_QUEUE,
            &tag,
            BasicConsumeOptions::default(),
            arguments,
        )
        .await?;
    // Everything already delivered, up to batch_size, without waiting for more: under load
    // deliveries pile up while a transaction runs, so batches grow by themselves.
    let mut batches = consumer.ready_chunks(options.batch_size.max(1));
    tracing::debug!(%tag, ?options, "consuming purchases");
    let result = loop {
        let next = tokio::select! {
            () = stop.cancelled() => break Ok(()),
            next = batches.next() => next,
        };
        let Some(chunk) = next else {
            break Err(anyhow::anyhow!("the broker cancelled consumer {tag}"));
        };
        let deliveries = match chunk
            .into_iter()
            .collect::<Result<Vec<Delivery>, lapin::Error>>()
        {
            Ok(d) => d,
            Err(e) => break Err(e.into()),
        };
        if let Err(e) = handle(&ctx, &channel, deliveries, &cancel).await {
            break Err(e);
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

/// How a batch attempt ended.
enum Attempt {
    Done(Vec<Disposition>),
    /// Shutdown while the database was unavailable: leave the batch to be redelivered.
    Cancelled,
    /// A bug or bad data (panic, constraint violation): isolate it message by message.
    Failed(String),
}

/// Processes a batch, retrying while the database is unavailable. Errors are classified once,
/// by [`upline_common::db::classify`]: an infrastructure error (outage, failover, timeout,
/// schema not migrated yet) opens the circuit and is retried with backoff, the messages left
/// unacknowledged; only a content error or a panic fails the batch.
async fn attempt(ctx: &Ctx, deliveries: &[Delivery], cancel: &CancellationToken) -> Attempt {
    let mut retries = 0u32;
    loop {
        // While the circuit is open, one consumer at a time tries the database.
        let _probe = ctx.circuit.pass().await;
        // A panic is caught here (the task fails alone), not in the consumer loop.
        let task = {
            let ctx = ctx.clone();
            let owned: Vec<(String, Vec<u8>)> = deliveries
                .iter()
                .map(|d| (d.routing_key.to_string(), d.data.clone()))
                .collect();
            tokio::spawn(async move {
                let messages: Vec<Message<'_>> = owned
                    .iter()
                    .map(|(routing_key, body)| Message { routing_key, body })
                    .collect();
                process_batch(&ctx, &messages).await
            })
        };
        match task.await {
            Ok(Ok(dispositions)) => {
                ctx.circuit.close();
                return Attempt::Done(dispositions);
            }
            Ok(Err(e)) if classify(&e) == ErrorClass::Infrastructure => {
                ctx.circuit.open();
                retries += 1;
                let wait = Duration::from_millis(100 * 2u64.pow(retries.min(6)));
                tracing::warn!(error = %e, retries, retry_in = ?wait, "database unavailable; the batch stays unacknowledged and is retried");
                tokio::select! {
                    () = cancel.cancelled() => return Attempt::Cancelled,
                    () = tokio::time::sleep(wait) => {}
                }
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, size = deliveries.len(), "batch could not be recorded");
                return Attempt::Failed(format!("database error: {e}"));
            }
            Err(join) => {
                tracing::error!(error = %join, size = deliveries.len(), "processing panicked");
                return Attempt::Failed("worker panicked while processing this message".into());
            }
        }
    }
}

/// Processes deliveries to their end: dead-letter what must be, then one ack for all of them
/// after the commit; or, on shutdown during a database outage, return them to the queue.
async fn handle(
    ctx: &Ctx,
    channel: &Channel,
    deliveries: Vec<Delivery>,
    cancel: &CancellationToken,
) -> anyhow::Result<()> {
    let Some(last) = deliveries.last().map(|d| d.delivery_tag) else {
        return Ok(());
    };
    let started = std::time::Instant::now();
    let dispositions = match attempt(ctx, &deliveries, cancel).await {
        Attempt::Done(d) => d,
        Attempt::Cancelled => {
            channel
                .basic_nack(
                    last,
                    BasicNackOptions {
                        multiple: true,
                        requeue: true,
                    },
                )
                .await?;
            return Ok(());
        }
        Attempt::Failed(_) if deliveries.len() > 1 => {
            // Find the poison message: one by one, each its own transaction and ack.
            for delivery in deliveries {
                Box::pin(handle(ctx, channel, vec![delivery], cancel)).await?;
            }
            return Ok(());
        }
        Attempt::Failed(reason) => vec![Disposition::DeadLetter(reason)],
    };
    let mut confirms = Vec::new();
    for (delivery, disposition) in deliveries.iter().zip(&dispositions) {
        if let Disposition::DeadLetter(reason) = disposition {
            tracing::warn!(%reason, "dead-lettering purchase message");
            let props = amqp::with_error_header(&delivery.properties, reason);
            confirms.push(
                channel
                    .basic_publish(
                        amqp::PURCHASES_DLX,
                        // Kept so that `upline dlq replay` sends a refund back as a refund.
                        delivery.routing_key.as_str(),
                        BasicPublishOptions::default(),
                        &delivery.data,
                        props,
                    )
                    .await?,
            );
        }
    }
    for confirm in confirms {
        if !confirm.await?.is_ack() {
            anyhow::bail!("the broker refused a dead-lettered copy");
        }
        metrics::counter!("upline_purchases_total", "result" => "dead_lettered").increment(1);
    }
    channel
        .basic_ack(last, BasicAckOptions { multiple: true })
        .await?;
    metrics::histogram!("upline_batch_seconds").record(started.elapsed().as_secs_f64());
    metrics::histogram!("upline_batch_size").record(deliveries.len() as f64);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::ConsumerOptions;

    /// The first consumer has the highest priority, the last 0; one consumer alone has 0.
    #[test]
    fn consumer_priorities_descend_to_zero() {
        let priorities: Vec<i32> = (0..3).map(|i| ConsumerOptions::priority_of(i, 3)).collect();
        assert_eq!(priorities, [2, 1, 0]);
        assert_eq!(ConsumerOptions::priority_of(0, 1), 0);
    }
}
