//! Processing purchase messages, without any broker types: read, validate, record a batch in
//! one transaction. The consumer turns each [`Disposition`] into an acknowledgement or a
//! dead-letter.

use std::sync::Arc;

use sqlx::PgPool;
use tokio::sync::Notify;
use upline_common::purchase;
use upline_common::rules::Rules;

use crate::ledger::{self, Incoming, Item, Recorded};

/// What a worker needs to process purchases.
#[derive(Clone)]
pub struct Ctx {
    pub db: PgPool,
    pub rules: Arc<Rules>,
    /// Woken after a commit that queued earnings in the outbox.
    pub outbox_ready: Arc<Notify>,
    /// Open while the database fails: consumers wait, one probes (see [`crate::circuit`]).
    pub circuit: Arc<crate::circuit::Circuit>,
    /// Largest message body read (`worker.max_message_bytes`); bigger ones are dead-lettered.
    pub max_message_bytes: usize,
}

/// What to do with a message once processing is over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    /// Effects are committed (or there were none to make): acknowledge.
    Done(Recorded),
    /// The message can never be processed: dead-letter it with this reason.
    DeadLetter(String),
}

/// Processes message bodies in one transaction; one [`Disposition`] per body, in order.
///
/// # Errors
/// Database errors, all of them before or at the commit: nothing of the batch is recorded,
/// and the caller retries or leaves the messages unacknowledged.
pub async fn process_batch(ctx: &Ctx, bodies: &[&[u8]]) -> sqlx::Result<Vec<Disposition>> {
    let mut dispositions: Vec<Option<Disposition>> = vec![None; bodies.len()];
    let mut items = Vec::with_capacity(bodies.len());
    let mut positions = Vec::with_capacity(bodies.len());
    for (i, body) in bodies.iter().enumerate() {
        if body.len() > ctx.max_message_bytes {
            dispositions[i] = Some(Disposition::DeadLetter(format!(
                "message too large: {} bytes, more than worker.max_message_bytes = {}",
                body.len(),
                ctx.max_message_bytes
            )));
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
    if !items.is_empty() {
        let recorded = ledger::record_batch(&ctx.db, &ctx.rules, &items).await?;
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
        if credited > 0 {
            ctx.outbox_ready.notify_one();
        }
    }
    Ok(dispositions
        .into_iter()
        .map(|d| d.expect("every body gets a disposition"))
        .collect())
}
