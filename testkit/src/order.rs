//! A purchase as a client sends it (the body of `POST /api/purchases`, SPEC §3), and the
//! same purchase published straight onto `upline.purchases` through the one
//! [`Publisher`] the api uses too.

use anyhow::Context;
use backon::Retryable;
use rust_decimal::Decimal;
use serde::Serialize;
use upline_common::amqp::Publisher;
use upline_common::money::Money;
use upline_common::purchase::{Purchase, PurchaseId};
use upline_common::UserId;

/// A purchase to send: serialises as the REST body (`amount` and `profit` as decimal strings
/// in rupees; no `currency`, so the configured one applies).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Order {
    /// The idempotency key.
    pub purchase_id: String,
    /// The buyer's user id.
    pub buyer_id: UserId,
    /// Amount in rupees.
    pub amount: Decimal,
    /// Profit in rupees; commissions are computed on it instead of the amount when given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profit: Option<Decimal>,
}

impl Order {
    /// An order without a profit.
    pub fn new(purchase_id: impl Into<String>, buyer_id: UserId, amount: Decimal) -> Self {
        Order {
            purchase_id: purchase_id.into(),
            buyer_id,
            amount,
            profit: None,
        }
    }

    /// The message a producer publishes for it, in `currency`.
    ///
    /// # Errors
    /// An id, amount or profit the contract does not allow.
    pub fn to_purchase(&self, currency: &str) -> anyhow::Result<Purchase> {
        let money = |d: Decimal| Money::from_decimal(d).with_context(|| format!("amount {d}"));
        Ok(Purchase {
            purchase_id: PurchaseId::parse(&self.purchase_id)
                .map_err(|e| anyhow::anyhow!("purchase_id: {e}"))?,
            buyer_id: self.buyer_id,
            amount: money(self.amount)?,
            currency: currency.to_owned(),
            profit: self.profit.map(money).transpose()?,
            occurred_at: None,
        })
    }
}

/// Publishes `orders` in `currency`, in their order, through `publisher` (persistent,
/// mandatory, `message_id` = purchase id, pipelined); returns when every one was confirmed.
/// When the broker does not confirm them all (a node lost, say), all are published again, as
/// a producer should: each is idempotent by its purchase id (contract §3). Backoff from 100 ms
/// doubling to 5 s, jittered, at most 40 times.
///
/// # Errors
/// An order that is not a valid purchase, or publishes still unconfirmed after the retries.
pub async fn publish(
    publisher: &Publisher,
    orders: &[Order],
    currency: &str,
) -> anyhow::Result<()> {
    let purchases = orders
        .iter()
        .map(|o| o.to_purchase(currency))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let publish_all = || publisher.publish_all(&purchases);
    publish_all
        .retry(upline_common::amqp::backoff().with_max_times(40))
        .sleep(tokio::time::sleep)
        .notify(|e, wait| eprintln!("publishing again in {wait:?}: {e}"))
        .await?;
    Ok(())
}
