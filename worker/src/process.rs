//! Processing messages from `upline.purchases`, without any broker types: purchases (routing
//! key `purchase`) are read, validated and recorded as a batch in one transaction; refunds
//! (routing key `refund`, contract §10) after it, each in a transaction of its own, followed by
//! any refund that was waiting for one of the batch's purchases. The consumer turns each
//! [`Disposition`] into an acknowledgement or a dead-letter.

use std::sync::Arc;

use sqlx::PgPool;
use tokio::sync::Notify;
use upline_common::rules::Rules;
use upline_common::{amqp, purchase, refund};

use crate::ledger::lifecycle::{self, RefundRecorded};
use crate::ledger::{self, Incoming, Item, Recorded};

/// What a worker needs to process purchases.
#[derive(Clone)]
pub struct Ctx {
    pub db: PgPool,
    pub rules: Arc<Rules>,
    /// Woken after a commit that queued earnings in the outbox free for any relay (refunds).
    pub outbox_ready: Arc<Notify>,
    /// Takes the events of each committed purchase batch to this worker's relay, which
    /// publishes them at once; their outbox rows are leased to it.
    pub direct: crate::outbox::Direct,
    /// Open while the database fails: consumers wait, one probes (see [`crate::circuit`]).
    pub circuit: Arc<crate::circuit::Circuit>,
    /// Largest message body read (`worker.max_message_bytes`); bigger ones are dead-lettered.
    pub max_message_bytes: usize,
    /// The ledger gate this consumer's purchase batches pass before they lock their earners
    /// ([`ledger::Gate`]); `None` locks them without one.
    pub gate: Option<ledger::Gate>,
}

/// What to do with a message once processing is over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    /// Effects are committed (or there were none to make): acknowledge.
    Done(Recorded),
    /// A refund's effects are committed (or it is parked): acknowledge.
    Refund(RefundRecorded),
    /// The message can never be processed: dead-letter it with this reason.
    DeadLetter(String),
}

/// One message as delivered: its routing key and body.
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    /// `purchase` or `refund`.
    pub routing_key: &'a str,
    pub body: &'a [u8],
}

/// Processes messages: the purchases in one transaction, then the refunds, each in its own;
/// one [`Disposition`] per message, in order.
///
/// # Errors
/// Database errors. Nothing of the purchases is recorded when they fail; refunds recorded
/// before a failure stay recorded, and a retry finds them as duplicates.
pub async fn process_batch(ctx: &Ctx, messages: &[Message<'_>]) -> sqlx::Result<Vec<Disposition>> {
    let mut dispositions: Vec<Option<Disposition>> = vec![None; messages.len()];
    let mut items = Vec::with_capacity(messages.len());
    let mut positions = Vec::with_capacity(messages.len());
    let mut refunds = Vec::new();
    for (i, message) in messages.iter().enumerate() {
        let body = message.body;
        if body.len() > ctx.max_message_bytes {
            dispositions[i] = Some(Disposition::DeadLetter(format!(
                "message too large: {} bytes, more than worker.max_message_bytes = {}",
                body.len(),
                ctx.max_message_bytes
            )));
            continue;
        }
        if message.routing_key == amqp::REFUND_ROUTING_KEY {
            match refund::read(body) {
                Err(reason) => dispositions[i] = Some(Disposition::DeadLetter(reason)),
                Ok(incoming) => refunds.push((i, incoming)),
            }
            continue;
        }
        match purchase::read(body) {
            Err(unreadable) => {
                dispositions[i] = Some(Disposition::DeadLetter(unreadable.to_string()))
            }
            Ok((message, map)) => {
                let purchase_id = message.purchase_id.clone();
                let incoming = match message.validate(&ctx.rules) {
                    Ok(p) => Incoming::Valid(p),
                    Err(invalid) => Incoming::Invalid {
                        purchase_id,
                        reason: invalid.to_string(),
                    },
                };
                items.push(Item {
                    incoming,
                    body: map,
                });
                positions.push(i);
            }
        }
    }
    let mut processed: Vec<String> = Vec::new();
    if !items.is_empty() {
        let committed = ledger::record_batch(
            &ctx.db,
            &ctx.rules,
            &items,
            Some(&ctx.direct.lease),
            ctx.gate,
        )
        .await?;
        ctx.direct.hand_over(committed.events).await;
        let recorded = committed.results;
        processed = items
            .iter()
            .zip(&recorded)
            .filter(|(_, r)| matches!(r, Recorded::Processed { .. }))
            .map(|(item, _)| item.purchase_id().as_str().to_owned())
            .collect();
        let mut credited = 0;
        for (position, recorded) in positions.into_iter().zip(recorded) {
            let result = match &recorded {
                Recorded::Processed { earnings } => {
                    credited += earnings;
                    "processed"
                }
                Recorded::Rejected { reason } => {
                    tracing::info!(%reason, "purchase rejected");
                    "rejected"
                }
                Recorded::Duplicate => "duplicate",
                Recorded::Conflict => {
                    tracing::warn!(
                        "purchase id reused with different content; recorded as a conflict"
                    );
                    "conflict"
                }
            };
            metrics::counter!("upline_purchases_total", "result" => result).increment(1);
            dispositions[position] = Some(Disposition::Done(recorded));
        }
        metrics::counter!("upline_earnings_credited_total").increment(credited as u64);
    }
    let mut changed = false;
    for (i, incoming) in refunds {
        let recorded = lifecycle::record_refund(&ctx.db, &ctx.rules, &incoming).await?;
        match &recorded {
            RefundRecorded::Applied { reversals } => changed |= *reversals > 0,
            RefundRecorded::Rejected { reason } => tracing::info!(%reason, "refund rejected"),
            RefundRecorded::Conflict => {
                tracing::warn!("refund id reused with different content; nothing changed");
            }
            RefundRecorded::Waiting | RefundRecorded::Duplicate => {}
        }
        lifecycle::count(&recorded);
        dispositions[i] = Some(Disposition::Refund(recorded));
    }
    // Refunds that arrived before these purchases. (One that raced the purchase's commit and
    // is missed here is applied by the schedule's sweep.)
    if !processed.is_empty() {
        changed |= lifecycle::apply_waiting(&ctx.db, &ctx.rules, Some(&processed)).await? > 0;
    }
    if changed {
        ctx.outbox_ready.notify_one();
    }
    Ok(dispositions
        .into_iter()
        .map(|d| d.expect("every body gets a disposition"))
        .collect())
}
