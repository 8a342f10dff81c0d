//! Reading purchase messages (SPEC §3): the same rules whether a purchase arrives over REST or
//! straight from the queue. Two kinds of failure, handled differently:
//! [`Unreadable`] (not JSON, no usable `purchase_id`) is dead-lettered; [`Invalid`] (a usable
//! id with bad content) is stored as a `rejected` purchase with its reason.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::config::Rules;
use crate::money::{Money, MoneyError};
use crate::UserId;

/// The idempotency key of a purchase: 1–64 characters of `A-Za-z0-9._:-` (SPEC §3).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PurchaseId(String);

impl PurchaseId {
    /// # Errors
    /// A message naming the rule that `s` breaks.
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.is_empty() || s.len() > 64 {
            return Err(format!(
                "must be 1 to 64 characters, found {}",
                s.chars().count()
            ));
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')))
        {
            return Err(format!(
                "may contain only A-Z a-z 0-9 . _ : - (found {c:?})"
            ));
        }
        Ok(PurchaseId(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for PurchaseId {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        PurchaseId::parse(&s)
    }
}

impl From<PurchaseId> for String {
    fn from(id: PurchaseId) -> String {
        id.0
    }
}

impl fmt::Display for PurchaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A message that cannot be processed at all: it goes to `upline.purchases.dead` with this
/// text in the `x-upline-error` header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unreadable {
    #[error("body is not JSON: {0}")]
    NotJson(String),
    #[error("body is not a JSON object")]
    NotAnObject,
    #[error("purchase_id is missing")]
    MissingPurchaseId,
    #[error("purchase_id must be a string")]
    PurchaseIdNotAString,
    #[error("purchase_id {0}")]
    BadPurchaseId(String),
    #[error("body contains a NUL character (\\u0000), which cannot be stored")]
    ContainsNul,
}

/// Bad content under a usable purchase id: which field, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct Invalid {
    /// The JSON field at fault, as named in SPEC §3.
    pub field: &'static str,
    pub message: String,
}

impl Invalid {
    pub fn new(field: &'static str, message: impl Into<String>) -> Self {
        Invalid {
            field,
            message: message.into(),
        }
    }
}

/// A valid purchase, as published on `upline.purchases` (SPEC §3) and processed by workers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Purchase {
    pub purchase_id: PurchaseId,
    pub buyer_id: UserId,
    pub amount: Money,
    /// Always present once validated: the configured currency when the message had none.
    pub currency: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profit: Option<Money>,
    /// As sent by the producer; `None` means "use the receipt time".
    #[serde(
        skip_serializing_if = "Option::is_none",
        with = "time::serde::rfc3339::option",
        default
    )]
    pub occurred_at: Option<OffsetDateTime>,
}

impl Purchase {
    /// What commissions are computed on (SPEC §2): the profit when given, else the amount.
    pub fn commission_base(&self) -> Money {
        self.profit.unwrap_or(self.amount)
    }

    /// A canonical text of the content: equal for a redelivery or republish of the same
    /// purchase (`"2000"` and `2000.00` are the same amount), different for a conflicting one.
    pub fn fingerprint(&self) -> String {
        let occurred = self
            .occurred_at
            .and_then(|t| t.to_offset(time::UtcOffset::UTC).format(&Rfc3339).ok())
            .unwrap_or_default();
        let profit = self.profit.map(|p| p.to_string()).unwrap_or_default();
        format!(
            "v1|{}|{}|{}|{}|{}",
            self.buyer_id, self.amount, self.currency, profit, occurred
        )
    }

    /// The message body published to `upline.purchases`.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a Purchase always serialises")
    }
}

/// The fingerprint of content that did not validate: its canonical JSON (keys sorted).
pub fn raw_fingerprint(body: &Value) -> String {
    format!("raw|{body}")
}

/// Reads a message body far enough to find its idempotency key.
///
/// # Errors
/// [`Unreadable`] when the body is not a JSON object with a usable `purchase_id`.
pub fn read(body: &[u8]) -> Result<(PurchaseId, Map<String, Value>), Unreadable> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| Unreadable::NotJson(e.to_string()))?;
    let Value::Object(map) = value else {
        return Err(Unreadable::NotAnObject);
    };
    if map.iter().any(|(k, v)| k.contains('\0') || contains_nul(v)) {
        return Err(Unreadable::ContainsNul);
    }
    let id = match map.get("purchase_id") {
        None | Some(Value::Null) => return Err(Unreadable::MissingPurchaseId),
        Some(Value::String(s)) => PurchaseId::parse(s).map_err(Unreadable::BadPurchaseId)?,
        Some(_) => return Err(Unreadable::PurchaseIdNotAString),
    };
    Ok((id, map))
}

/// Validates the content of a purchase message against the rules (SPEC §2–3). Unknown fields
/// are ignored. Whether the buyer exists is for the caller to check.
///
/// # Errors
/// The first [`Invalid`] field, in the order `buyer_id`, `amount`, `currency`, `profit`,
/// `occurred_at`.
pub fn validate(
    purchase_id: PurchaseId,
    map: &Map<String, Value>,
    rules: &Rules,
) -> Result<Purchase, Invalid> {
    let buyer_id = match map.get("buyer_id") {
        None | Some(Value::Null) => return Err(Invalid::new("buyer_id", "is required")),
        Some(v) => parse_user_id(v)
            .ok_or_else(|| Invalid::new("buyer_id", "must be a positive integer"))?,
    };
    let amount = match map.get("amount") {
        None | Some(Value::Null) => return Err(Invalid::new("amount", "is required")),
        Some(v) => Money::from_json(v).map_err(|e| Invalid::new("amount", e.to_string()))?,
    };
    let currency = match map.get("currency") {
        None | Some(Value::Null) => rules.currency.clone(),
        Some(Value::String(c)) if c.eq_ignore_ascii_case(&rules.currency) => rules.currency.clone(),
        Some(Value::String(c)) => {
            return Err(Invalid::new(
                "currency",
                format!("must be {}, found {c:?}", rules.currency),
            ))
        }
        Some(_) => return Err(Invalid::new("currency", "must be a string")),
    };
    let profit = match map.get("profit") {
        None | Some(Value::Null) => None,
        Some(v) => {
            let p = match v {
                Value::Number(n) => Money::parse_non_negative(&n.to_string()),
                Value::String(s) => Money::parse_non_negative(s),
                _ => Err(MoneyError::WrongType),
            }
            .map_err(|e| Invalid::new("profit", e.to_string()))?;
            if p > amount {
                return Err(Invalid::new("profit", "must not exceed amount"));
            }
            Some(p)
        }
    };
    let occurred_at = match map.get("occurred_at") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(OffsetDateTime::parse(s, &Rfc3339).map_err(|_| {
            Invalid::new(
                "occurred_at",
                "must be an RFC 3339 timestamp such as 2026-11-20T10:00:00Z",
            )
        })?),
        Some(_) => {
            return Err(Invalid::new(
                "occurred_at",
                "must be an RFC 3339 timestamp string",
            ))
        }
    };
    Ok(Purchase {
        purchase_id,
        buyer_id,
        amount,
        currency,
        profit,
        occurred_at,
    })
}

/// Whether any string or key in `v` contains NUL (PostgreSQL text and jsonb cannot hold it).
pub fn contains_nul(v: &Value) -> bool {
    match v {
        Value::String(s) => s.contains('\0'),
        Value::Array(a) => a.iter().any(contains_nul),
        Value::Object(m) => m.iter().any(|(k, v)| k.contains('\0') || contains_nul(v)),
        _ => false,
    }
}

/// A user id from JSON: a positive integer (`7` or `7.0`), or a string of digits.
pub fn parse_user_id(v: &Value) -> Option<UserId> {
    UserId::from_json(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal::Decimal;

    fn rules() -> Rules {
        Rules {
            rates: vec![Decimal::new(5, 2), Decimal::new(1, 2)],
            min_purchase: Money::parse("1000").expect("valid"),
            cap_per_level: None,
            currency: "INR".into(),
        }
    }

    fn check(body: &str) -> Result<Purchase, Invalid> {
        let (id, map) = read(body.as_bytes()).expect("readable");
        validate(id, &map, &rules())
    }

    #[test]
    fn the_spec_example_message_is_valid() {
        let p = check(
            r#"{"purchase_id":"ord-2026-000123","buyer_id":42,"amount":"2000.00","currency":"INR",
                "profit":"400.00","occurred_at":"2026-11-20T10:00:00Z","extra":1}"#,
        )
        .expect("valid");
        assert_eq!(p.buyer_id.get(), 42);
        assert_eq!(p.commission_base().to_string(), "400.00");
        let again = check(&String::from_utf8(p.to_json()).expect("utf8")).expect("round trip");
        assert_eq!(again, p);
    }

    #[test]
    fn unreadable_messages_say_why() {
        assert!(matches!(read(b"not json"), Err(Unreadable::NotJson(_))));
        assert_eq!(
            read(br#"{"purchase_id":"p","note":"a\u0000b"}"#).unwrap_err(),
            Unreadable::ContainsNul
        );
        assert_eq!(read(b"[1]").unwrap_err(), Unreadable::NotAnObject);
        assert_eq!(
            read(br#"{"buyer_id":1}"#).unwrap_err(),
            Unreadable::MissingPurchaseId
        );
        assert_eq!(
            read(br#"{"purchase_id":7}"#).unwrap_err(),
            Unreadable::PurchaseIdNotAString
        );
        assert!(matches!(
            read(br#"{"purchase_id":"a b"}"#),
            Err(Unreadable::BadPurchaseId(_))
        ));
        assert!(matches!(
            read(format!(r#"{{"purchase_id":"{}"}}"#, "x".repeat(65)).as_bytes()),
            Err(Unreadable::BadPurchaseId(_))
        ));
    }

    #[test]
    fn bad_content_names_the_field() {
        let field = |b: &str| check(b).unwrap_err().field;
        assert_eq!(field(r#"{"purchase_id":"p1","amount":"5"}"#), "buyer_id");
        assert_eq!(
            field(r#"{"purchase_id":"p1","buyer_id":-3,"amount":"5"}"#),
            "buyer_id"
        );
        assert_eq!(
            field(r#"{"purchase_id":"p1","buyer_id":3,"amount":"-5"}"#),
            "amount"
        );
        assert_eq!(
            field(r#"{"purchase_id":"p1","buyer_id":3,"amount":"5","currency":"USD"}"#),
            "currency"
        );
        assert_eq!(
            field(r#"{"purchase_id":"p1","buyer_id":3,"amount":"5","profit":"6"}"#),
            "profit"
        );
        assert_eq!(
            field(r#"{"purchase_id":"p1","buyer_id":3,"amount":"5","occurred_at":"yesterday"}"#),
            "occurred_at"
        );
    }

    #[test]
    fn the_same_purchase_written_differently_has_one_fingerprint() {
        let a = check(r#"{"purchase_id":"p1","buyer_id":3,"amount":2000}"#).expect("valid");
        let b = check(r#"{"purchase_id":"p1","buyer_id":"3","amount":"2000.00","currency":"inr"}"#)
            .expect("valid");
        let c = check(r#"{"purchase_id":"p1","buyer_id":3,"amount":"2000.01"}"#).expect("valid");
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert_ne!(a.fingerprint(), c.fingerprint());
    }
}
