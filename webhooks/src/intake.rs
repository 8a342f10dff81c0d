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
//!   A copy held for 5 s is parked in PostgreSQL (`webhook_purchase_waits`) and acknowledged,
//!   so that a purchase that is never recorded (one the workers dead-letter after a crash or a
//!   database error) cannot fill the prefetch and hold up the others; parked purchases are
//!   looked at again, 1,000 per poll, and their events queued once they are recorded. A message
//!   without a usable `purchase_id` is one the workers dead-letter at once: it has no outcome
//!   and is acknowledged.
//!
//! A message is acknowledged only after its webhook messages are committed (or when no enabled
//! endpoint wants its type), so a crash means redelivery; a redelivered event finds its message
//! stored and queues nothing twice. The events of a type nobody subscribes to are not stored.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

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
/// How long a purchase copy is held, unacknowledged, for its purchase to be recorded before it
/// is parked in PostgreSQL instead.
const PARK_AFTER: Duration = Duration::from_secs(5);
/// Parked purchases looked at per poll.
const PARKED_PER_ROUND: i64 = 1000;

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
    let mut held = Held::default();
    // Where the sweep through parked purchases goes on; `None` when none are parked.
    let mut parked_from: Option<String> = Some(String::new());
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
                    Some(id) => held.add(id, delivery.delivery_tag),
                    None => channel.basic_ack(delivery.delivery_tag, BasicAckOptions::default()).await?,
                }
                // Under load, take in what has arrived before looking up outcomes.
                if held.len() < usize::from(intake.prefetch) {
                    continue;
                }
            }
            _ = poll.tick() => {}
        }
        let wanted = wanted(&intake.db).await?;
        let wants = |t: &str| wanted.iter().any(|w| w == t);
        if !wants("purchase.processed") && !wants("purchase.rejected") {
            for (_, (tags, _)) in held.0.drain() {
                ack_all(&channel, &tags).await?;
            }
            continue;
        }
        if !held.is_empty() {
            let ids: Vec<String> = held.0.keys().cloned().collect();
            let recorded = queue_outcomes(&intake, &ids, &wants, &[]).await?;
            for id in &recorded {
                if let Some((tags, _)) = held.0.remove(id) {
                    ack_all(&channel, &tags).await?;
                }
            }
            // Held too long: parked in PostgreSQL and acknowledged, so that a purchase that
            // is never recorded cannot hold up the others.
            let overdue: Vec<String> = held
                .0
                .iter()
                .filter(|(_, (_, since))| since.elapsed() >= PARK_AFTER)
                .map(|(id, _)| id.clone())
                .collect();
            if !overdue.is_empty() {
                store::park_purchases(&intake.db, &overdue).await?;
                metrics::counter!("upline_webhook_purchases_parked_total")
                    .increment(overdue.len() as u64);
                for id in &overdue {
                    if let Some((tags, _)) = held.0.remove(id) {
                        ack_all(&channel, &tags).await?;
                    }
                }
                parked_from.get_or_insert_with(String::new);
            }
        }
        if let Some(after) = parked_from.take() {
            let parked = store::parked_purchases(&intake.db, &after, PARKED_PER_ROUND).await?;
            let recorded: Vec<String> = parked
                .iter()
                .filter(|(_, recorded)| *recorded)
                .map(|(id, _)| id.clone())
                .collect();
            if !recorded.is_empty() {
                queue_outcomes(&intake, &recorded, &wants, &recorded).await?;
            }
            // The next round goes on after the last one looked at; a short round ends the
            // pass, and only parked purchases still waiting start another.
            let full = parked.len() as i64 == PARKED_PER_ROUND;
            parked_from = match parked.last() {
                Some((last, _)) if full => Some(last.clone()),
                _ if parked.len() > recorded.len() => Some(String::new()),
                _ => None,
            };
        }
    }
}

/// Purchase id → the delivery tags waiting for its outcome, and since when.
#[derive(Default)]
struct Held(HashMap<String, (Vec<u64>, Instant)>);

impl Held {
    fn add(&mut self, id: String, tag: u64) {
        self.0
            .entry(id)
            .or_insert_with(|| (Vec::new(), Instant::now()))
            .0
            .push(tag);
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Looks up the purchases of `ids`, queues the events of those recorded (for the wanted
/// types) and deletes `resolved` from the parked purchases in the same transaction. Returns
/// the ids recorded.
async fn queue_outcomes(
    intake: &Intake,
    ids: &[String],
    wants: &impl Fn(&str) -> bool,
    resolved: &[String],
) -> sqlx::Result<Vec<String>> {
    let (outcomes, levels) = store::purchase_outcomes(&intake.db, ids).await?;
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
    let queued = if resolved.is_empty() {
        store::queue(&intake.db, &messages).await?
    } else {
        store::queue_resolved(&intake.db, &messages, resolved).await?
    };
    if queued > 0 {
        metrics::counter!("upline_webhook_deliveries_queued_total").increment(queued);
        intake.queued.notify_one();
    }
    Ok(outcomes.into_iter().map(|o| o.purchase_id).collect())
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
