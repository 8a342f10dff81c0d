//! Processing one purchase message, without any broker types: read it, validate it, record it.
//! The consumer turns the [`Disposition`] into an acknowledgement or a dead-letter.

use std::sync::Arc;

use sqlx::PgPool;
use tokio::sync::Notify;
use upline_common::purchase::{self, Unreadable};
use upline_common::rules::Rules;

use crate::ledger::{self, Incoming, Recorded};

/// What a worker needs to process purchases.
#[derive(Clone)]
pub struct Ctx {
    pub db: PgPool,
    pub rules: Arc<Rules>,
    /// Woken after a commit that queued earnings in the outbox.
    pub outbox_ready: Arc<Notify>,
}

/// What to do with a message once processing is over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    /// Effects are committed (or there were none to make): acknowledge.
    Done(Recorded),
    /// The message can never be processed: dead-letter it with this reason.
    DeadLetter(String),
}

/// Processes one message body.
///
/// # Errors
/// Database errors, all of them before or at the commit: the caller retries or leaves the
/// message unacknowledged, and a later attempt finds either nothing or the committed result.
pub async fn process(ctx: &Ctx, body: &[u8]) -> sqlx::Result<Disposition> {
    let (purchase_id, map) = match purchase::read(body) {
        Ok(read) => read,
        Err(
            e @ (Unreadable::NotJson(_)
            | Unreadable::NotAnObject
            | Unreadable::MissingPurchaseId
            | Unreadable::PurchaseIdNotAString
            | Unreadable::BadPurchaseId(_)),
        ) => return Ok(Disposition::DeadLetter(e.to_string())),
    };
    let incoming = match purchase::validate(purchase_id.clone(), &map, &ctx.rules) {
        Ok(p) => Incoming::Valid(p),
        Err(invalid) => Incoming::Invalid {
            purchase_id,
            reason: invalid.to_string(),
        },
    };
    let recorded = ledger::record(&ctx.db, &ctx.rules, &incoming, &map).await?;
    let result = match &recorded {
        Recorded::Processed { earnings } => {
            metrics::counter!("upline_earnings_credited_total").increment(*earnings as u64);
            if *earnings > 0 {
                ctx.outbox_ready.notify_one();
            }
            "processed"
        }
        Recorded::Rejected { reason } => {
            tracing::info!(%reason, "purchase rejected");
            "rejected"
        }
        Recorded::Duplicate => "duplicate",
        Recorded::Conflict => {
            tracing::warn!("purchase id reused with different content; recorded as a conflict");
            "conflict"
        }
    };
    metrics::counter!("upline_purchases_total", "result" => result).increment(1);
    Ok(Disposition::Done(recorded))
}
