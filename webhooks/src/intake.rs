//! From the broker into PostgreSQL: the two consumers that turn events into webhook messages
//! and queue a delivery of each to every enabled endpoint subscribed to its type (contract §11).
//!
//! - **Earning events** (`upline.webhooks.earnings`, a copy of everything published to
//!   `upline.earnings`): each becomes `earning.created`, `earning.reversed`,
//!   `earning.approved` or `earning.paid` by its `kind`, with `webhook-id`
//!   `msg_earning_<earning_id>`.
//! - **Purchases** (`upline.webhooks.purchases`, a copy of every purchase message): each is
//!   held, unacknowledged, until a worker has recorded the purchase, then becomes
//!   `purchase.processed` or `purchase.rejected` with `webhook-id` `msg_purchase_<purchase_id>`.
//!   A message without a usable `purchase_id` is one the workers dead-letter: it has no outcome
//!   and is acknowledged at once.
//!
//! A message is acknowledged only after its webhook messages are committed (or when no enabled
//! endpoint wants its type), so a crash means redelivery; a redelivered event finds its message
//! stored and queues nothing twice. The events of a type nobody subscribes to are not stored.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use serde::Serialize;
use serde_json::value::RawValue;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use upline_common::webhook::earning_event_type;
use upline_common::{amqp, Money};

use crate::store::{self, NewMessage};

/// How often purchases held for their outcome are looked up again.
const OUTCOME_POLL: Duration = Duration::from_millis(200);

/// What the consumers need.
#[derive(Clone)]
pub struct Intake {
    pub db: PgPool,
    /// Woken when deliveries were queued.
    pub queued: Arc<Notify>,
    pub prefetch: u16,
    /// `worker.max_message_bytes`: bigger purchase messages are dead-lettered by the workers.
    pub max_message_bytes: usize,
}

/// The body of every webhook (contract §11): the Standard Webhooks envelope.
#[derive(Serialize)]
struct Envelope<'a, T: Serialize + ?Sized> {
    #[serde(rename = "type")]
    event_type: &'a str,
    timestamp: &'a str,
    data: &'a T,
}

fn envelope<T: Serialize + ?Sized>(event_type: &str, timestamp: &str, data: &T) -> String {
    serde_json::to_string(&Envelope {
        event_type,
        timestamp,
        data,
    })
    .expect("an envelope serialises")
}

/// The event types some enabled endpoint receives.
async fn wanted(db: &PgPool) -> sqlx::Result<Vec<String>> {
    let mut types: Vec<String> = store::subscriptions(db)
        .await?
        .into_iter()
        .flat_map(|s| s.event_types)
        .collect();
    types.sort();
    types.dedup();
    Ok(types)
}

/// Consumes `upline.webhooks.earnings` until `cancel` fires or the channel fails.
///
/// # Errors
/// Broker errors; database errors (the batch is left unacknowledged and redelivered).
pub async fn earnings(
    intake: Intake,
    conn: &Connection,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let channel = consumer_channel(conn, intake.prefetch).await?;
    let consumer = channel
        .basic_consume(
            amqp::WEBHOOK_EARNINGS_QUEUE,
            "upline-webhooks-earnings",
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut batches = consumer.ready_chunks(usize::from(intake.prefetch));
    loop {
        let chunk = tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            chunk = batches.next() => chunk,
        };
        let Some(chunk) = chunk else {
            anyhow::bail!("the broker cancelled the earnings consumer");
        };
        let deliveries = chunk.into_iter().collect::<Result<Vec<Delivery>, _>>()?;
        let Some(last) = deliveries.last().map(|d| d.delivery_tag) else {
            continue;
        };
        let wanted = wanted(&intake.db).await?;
        let messages: Vec<NewMessage> = deliveries
            .iter()
            .filter_map(|d| earning_message(&d.data))
            .filter(|m| wanted.contains(&m.event_type))
            .collect();
        let queued = store::queue(&intake.db, &messages).await?;
        if queued > 0 {
            metrics::counter!("upline_webhook_deliveries_queued_total").increment(queued);
            intake.queued.notify_one();
        }
        channel
            .basic_ack(last, BasicAckOptions { multiple: true })
            .await?;
    }
}

/// The webhook message of an earning event, or `None` (logged) for a body that is not one.
fn earning_message(body: &[u8]) -> Option<NewMessage> {
    #[derive(serde::Deserialize)]
    struct Head<'a> {
        earning_id: i64,
        kind: Option<&'a str>,
        #[serde(borrow)]
        created_at: &'a str,
    }
    let raw: &RawValue = match serde_json::from_slice(body) {
        Ok(raw) => raw,
        Err(e) => {
            tracing::warn!(error = %e, "an earning event that is not JSON; no webhook for it");
            return None;
        }
    };
    let head: Head<'_> = match serde_json::from_str(raw.get()) {
        Ok(head) => head,
        Err(e) => {
            tracing::warn!(error = %e, "an earning event without earning_id or created_at; no webhook for it");
            return None;
        }
    };
    let kind = head.kind.unwrap_or("commission");
    let Some(event_type) = earning_event_type(kind) else {
        tracing::debug!(kind, "an earning kind without a webhook event type");
        return None;
    };
    Some(NewMessage {
        id: format!("msg_earning_{}", head.earning_id),
        event_type: event_type.to_owned(),
        payload: envelope(event_type, head.created_at, raw),
    })
}

/// Consumes `upline.webhooks.purchases` until `cancel` fires or the channel fails: each
/// message waits until its purchase is recorded (see the module docs).
///
/// # Errors
/// Broker errors; database errors (what is held is redelivered).
pub async fn purchases(
    intake: Intake,
    conn: &Connection,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let channel = consumer_channel(conn, intake.prefetch).await?;
    let mut consumer = channel
        .basic_consume(
            amqp::WEBHOOK_PURCHASES_QUEUE,
            "upline-webhooks-purchases",
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    // Purchase id → the delivery tags waiting for its outcome.
    let mut held: HashMap<String, Vec<u64>> = HashMap::new();
    let mut poll = tokio::time::interval(OUTCOME_POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            next = consumer.next() => {
                let Some(delivery) = next else {
                    anyhow::bail!("the broker cancelled the purchases consumer");
                };
                let delivery = delivery?;
                match usable_purchase_id(&delivery.data, intake.max_message_bytes) {
                    Some(id) => held.entry(id).or_default().push(delivery.delivery_tag),
                    None => channel.basic_ack(delivery.delivery_tag, BasicAckOptions::default()).await?,
                }
                // Under load, take in what has arrived before looking up outcomes.
                if held.len() < usize::from(intake.prefetch) {
                    continue;
                }
            }
            _ = poll.tick() => {}
        }
        if held.is_empty() {
            continue;
        }
        let wanted = wanted(&intake.db).await?;
        let wants = |t: &str| wanted.iter().any(|w| w == t);
        if !wants("purchase.processed") && !wants("purchase.rejected") {
            for (_, tags) in held.drain() {
                ack_all(&channel, &tags).await?;
            }
            continue;
        }
        let ids: Vec<String> = held.keys().cloned().collect();
        let (outcomes, levels) = store::purchase_outcomes(&intake.db, &ids).await?;
        let mut messages = Vec::with_capacity(outcomes.len());
        for outcome in &outcomes {
            let event_type = match outcome.status.as_str() {
                "processed" => "purchase.processed",
                _ => "purchase.rejected",
            };
            if wants(event_type) {
                let own = levels
                    .iter()
                    .filter(|l| l.purchase_id == outcome.purchase_id);
                messages.push(purchase_message(event_type, outcome, own));
            }
        }
        let queued = store::queue(&intake.db, &messages).await?;
        if queued > 0 {
            metrics::counter!("upline_webhook_deliveries_queued_total").increment(queued);
            intake.queued.notify_one();
        }
        for outcome in &outcomes {
            if let Some(tags) = held.remove(&outcome.purchase_id) {
                ack_all(&channel, &tags).await?;
            }
        }
    }
}

async fn ack_all(channel: &Channel, tags: &[u64]) -> lapin::Result<()> {
    for tag in tags {
        channel.basic_ack(*tag, BasicAckOptions::default()).await?;
    }
    Ok(())
}

/// The purchase id of a message a worker will record (see [`upline_common::purchase::read`]),
/// or `None` for one it dead-letters.
fn usable_purchase_id(body: &[u8], max_message_bytes: usize) -> Option<String> {
    if body.len() > max_message_bytes {
        return None;
    }
    upline_common::purchase::read(body)
        .ok()
        .map(|(message, _)| message.purchase_id.to_string())
}

/// `data` of a `purchase.*` webhook.
#[derive(Serialize)]
struct PurchaseData<'a> {
    purchase_id: &'a str,
    status: &'a str,
    reason: Option<&'a str>,
    buyer_id: Option<i64>,
    amount: Option<Money>,
    currency: Option<&'a str>,
    processed_at: &'a str,
    levels: Vec<LevelData<'a>>,
}

#[derive(Serialize)]
struct LevelData<'a> {
    level: i16,
    earner_id: Option<i64>,
    outcome: &'a str,
    amount: Money,
    earning_id: Option<i64>,
}

fn purchase_message<'a>(
    event_type: &str,
    p: &store::PurchaseOutcome,
    levels: impl Iterator<Item = &'a store::LevelOutcome>,
) -> NewMessage {
    let processed_at = p
        .processed_at
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let data = PurchaseData {
        purchase_id: &p.purchase_id,
        status: &p.status,
        reason: p.reason.as_deref(),
        buyer_id: p.buyer_id,
        amount: p.amount.map(Money::from_total),
        currency: p.currency.as_deref(),
        processed_at: &processed_at,
        levels: levels
            .map(|l| LevelData {
                level: l.level,
                earner_id: l.earner_id,
                outcome: &l.outcome,
                amount: Money::from_total(l.amount),
                earning_id: l.earning_id,
            })
            .collect(),
    };
    NewMessage {
        id: format!("msg_purchase_{}", p.purchase_id),
        event_type: event_type.to_owned(),
        payload: envelope(event_type, &processed_at, &data),
    }
}

async fn consumer_channel(conn: &Connection, prefetch: u16) -> lapin::Result<Channel> {
    let channel = conn.create_channel().await?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    Ok(channel)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_earning_event_becomes_its_webhook_with_the_event_as_sent() {
        let body = br#"{"earning_id": 9812, "seq": 17, "kind": "reversal", "amount": "-5.00", "created_at": "2026-11-20T10:00:00.123Z"}"#;
        let m = earning_message(body).unwrap();
        assert_eq!(m.id, "msg_earning_9812");
        assert_eq!(m.event_type, "earning.reversed");
        assert_eq!(
            m.payload,
            r#"{"type":"earning.reversed","timestamp":"2026-11-20T10:00:00.123Z","data":{"earning_id": 9812, "seq": 17, "kind": "reversal", "amount": "-5.00", "created_at": "2026-11-20T10:00:00.123Z"}}"#
        );
        assert!(earning_message(b"not json").is_none());
        assert!(earning_message(br#"{"kind":"commission"}"#).is_none());
    }
}
