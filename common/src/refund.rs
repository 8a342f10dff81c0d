//! Refunds (contract §10): the message on the queue and its reading. A refund names a
//! purchase and, optionally, an amount (none = everything still refundable); `refund_id` is its
//! idempotency key. The REST API (`POST /api/purchases/{purchase_id}/refunds`) publishes the
//! same message as external systems do: exchange `upline.purchases`, routing key
//! [`crate::amqp::REFUND_ROUTING_KEY`], persistent JSON.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;

use crate::money::Money;
use crate::purchase::{contains_nul, PurchaseId};

/// The idempotency key of a refund: 1–64 characters of `A-Za-z0-9._:-`, like a purchase id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RefundId(String);

impl RefundId {
    /// # Errors
    /// A message naming the rule that `s` breaks.
    pub fn parse(s: &str) -> Result<Self, String> {
        PurchaseId::parse(s).map(|_| RefundId(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for RefundId {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        RefundId::parse(&s)
    }
}

impl From<RefundId> for String {
    fn from(id: RefundId) -> String {
        id.0
    }
}

impl std::fmt::Display for RefundId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A valid refund as published on `upline.purchases` with routing key `refund`:
/// `{"refund_id": "rf-1", "purchase_id": "ord-1", "amount": "500.00"}` (`amount` optional).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({"refund_id": "rf-2026-000045", "purchase_id": "ord-2026-000123",
    "amount": "500.00"}))]
pub struct Refund {
    /// The idempotency key: 1–64 characters of `A-Za-z0-9._:-`.
    #[schema(value_type = String, pattern = r"^[A-Za-z0-9._:-]{1,64}$")]
    pub refund_id: RefundId,
    /// The purchase refunded; it may not have been processed yet (the refund then waits).
    #[schema(value_type = String, pattern = r"^[A-Za-z0-9._:-]{1,64}$")]
    pub purchase_id: PurchaseId,
    /// Rupees, positive; absent = everything of the purchase still refundable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, example = "500.00")]
    pub amount: Option<Money>,
}

impl Refund {
    /// A canonical text of the content: equal for a retry of the same refund (`"500"` and
    /// `500.00` are the same amount), different for a conflicting reuse of the id.
    pub fn fingerprint(&self) -> String {
        let amount = self.amount.map(|a| a.to_string()).unwrap_or_default();
        format!("v1|{}|{}", self.purchase_id, amount)
    }

    /// The message body published to `upline.purchases` with routing key `refund`.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a Refund always serialises")
    }
}

/// A refund message as read from the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// Valid: to apply.
    Valid(Refund),
    /// Usable ids but bad content (an amount that is not a positive amount of at most two
    /// places): stored as a `rejected` refund with `reason`, under `fingerprint`.
    Invalid {
        refund_id: RefundId,
        purchase_id: PurchaseId,
        reason: String,
        fingerprint: String,
    },
}

/// Reads a refund message body.
///
/// # Errors
/// The reason for the dead-letter header when the body is not a JSON object with a usable
/// `refund_id` and `purchase_id`.
pub fn read(body: &[u8]) -> Result<Incoming, String> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| format!("body is not JSON: {e}"))?;
    let Value::Object(map) = value else {
        return Err("body is not a JSON object".into());
    };
    if map.iter().any(|(k, v)| k.contains('\0') || contains_nul(v)) {
        return Err("body contains a NUL character (\\u0000), which cannot be stored".into());
    }
    let refund_id = id(&map, "refund_id")
        .and_then(|s| RefundId::parse(&s).map_err(|e| format!("refund_id {e}")))?;
    let purchase_id = id(&map, "purchase_id")
        .and_then(|s| PurchaseId::parse(&s).map_err(|e| format!("purchase_id {e}")))?;
    match map.get("amount") {
        None | Some(Value::Null) => Ok(Incoming::Valid(Refund {
            refund_id,
            purchase_id,
            amount: None,
        })),
        Some(v) => match Money::from_json(v) {
            Ok(amount) => Ok(Incoming::Valid(Refund {
                refund_id,
                purchase_id,
                amount: Some(amount),
            })),
            Err(e) => Ok(Incoming::Invalid {
                refund_id,
                purchase_id,
                reason: format!("amount: {e}"),
                fingerprint: format!("raw|{}", Value::Object(map.clone())),
            }),
        },
    }
}

fn id(map: &Map<String, Value>, field: &str) -> Result<String, String> {
    match map.get(field) {
        None | Some(Value::Null) => Err(format!("{field} is missing")),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(format!("{field} must be a string")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refund_reads_with_or_without_an_amount_and_fingerprints_by_value() {
        let full = read(br#"{"refund_id":"rf-1","purchase_id":"ord-1"}"#).expect("readable");
        let Incoming::Valid(full) = full else {
            panic!("valid")
        };
        assert_eq!(full.amount, None);
        let a = read(br#"{"refund_id":"rf-2","purchase_id":"ord-1","amount":500}"#);
        let b = read(br#"{"refund_id":"rf-2","purchase_id":"ord-1","amount":"500.00"}"#);
        let (Ok(Incoming::Valid(a)), Ok(Incoming::Valid(b))) = (a, b) else {
            panic!("valid")
        };
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert_ne!(a.fingerprint(), full.fingerprint());
        assert_eq!(
            serde_json::to_value(&a).expect("json"),
            serde_json::json!({"refund_id": "rf-2", "purchase_id": "ord-1", "amount": "500.00"})
        );
    }

    #[test]
    fn bad_ids_are_dead_lettered_and_a_bad_amount_is_rejected_with_its_reason() {
        assert_eq!(
            read(br#"{"purchase_id":"ord-1"}"#),
            Err("refund_id is missing".into())
        );
        assert!(read(br#"{"refund_id":"rf 1","purchase_id":"ord-1"}"#)
            .unwrap_err()
            .starts_with("refund_id may contain only"));
        assert_eq!(
            read(br#"{"refund_id":"rf-1","purchase_id":7}"#),
            Err("purchase_id must be a string".into())
        );
        let Ok(Incoming::Invalid { reason, .. }) =
            read(br#"{"refund_id":"rf-1","purchase_id":"ord-1","amount":"-5"}"#)
        else {
            panic!("stored as rejected")
        };
        assert_eq!(reason, "amount: must not be negative");
    }
}
