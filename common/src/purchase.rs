//! Reading purchase messages (SPEC §3): the same rules whether a purchase arrives over REST or
//! straight from the queue. Two kinds of failure, handled differently:
//! [`Unreadable`] (not JSON, no usable `purchase_id`) is dead-lettered; [`Invalid`] (a usable
//! id with bad content) is stored as a `rejected` purchase with its reason.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, OneOfBuilder, SchemaFormat, Type};
use utoipa::openapi::{RefOr, Schema};
use utoipa::ToSchema;

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

impl utoipa::PartialSchema for PurchaseId {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .pattern(Some(r"^[A-Za-z0-9._:-]{1,64}$"))
            .description(Some(
                "The idempotency key of a purchase: 1–64 characters of `A-Za-z0-9._:-`",
            ))
            .examples(["ord-2026-000123"])
            .into()
    }
}

impl ToSchema for PurchaseId {}

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

/// Reads a message body: a JSON object with a usable `purchase_id`, as a [`PurchaseMessage`]
/// and as the object received (kept for the conflict check and the record).
///
/// # Errors
/// [`Unreadable`] when the body is not a JSON object with a usable `purchase_id`.
pub fn read(body: &[u8]) -> Result<(PurchaseMessage, Map<String, Value>), Unreadable> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| Unreadable::NotJson(e.to_string()))?;
    let Value::Object(map) = value else {
        return Err(Unreadable::NotAnObject);
    };
    if map.iter().any(|(k, v)| k.contains('\0') || contains_nul(v)) {
        return Err(Unreadable::ContainsNul);
    }
    match map.get("purchase_id") {
        None | Some(Value::Null) => return Err(Unreadable::MissingPurchaseId),
        Some(Value::String(s)) => {
            PurchaseId::parse(s).map_err(Unreadable::BadPurchaseId)?;
        }
        Some(_) => return Err(Unreadable::PurchaseIdNotAString),
    }
    // Every other field is read leniently (`Field`), so this cannot fail any more.
    let message =
        PurchaseMessage::deserialize(&map).map_err(|e| Unreadable::BadPurchaseId(e.to_string()))?;
    Ok((message, map))
}

/// A value read from one JSON field by the lenient rules of SPEC §3 (ids as digit strings,
/// money as exact numbers or strings), with the message that names what is wrong otherwise.
pub trait FromJson: Sized {
    /// # Errors
    /// The message for the problem's `detail` / the rejection reason (`"<field>: <message>"`).
    fn from_json(v: &Value) -> Result<Self, String>;
}

/// One field of a purchase, read but not yet judged: the value, or why it is not one. The
/// judgement is deferred so that the first bad field is reported in the order of SPEC §3
/// (`buyer_id`, `amount`, `currency`, `profit`, `occurred_at`) whatever the order of the JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Field<T> {
    Valid(T),
    Invalid(String),
}

impl<T> Field<T> {
    fn get(self, field: &'static str) -> Result<T, Invalid> {
        match self {
            Field::Valid(v) => Ok(v),
            Field::Invalid(message) => Err(Invalid::new(field, message)),
        }
    }
}

impl<'de, T: FromJson> Deserialize<'de> for Field<T> {
    /// Never fails on a JSON value: a bad one becomes [`Field::Invalid`].
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        Ok(match T::from_json(&v) {
            Ok(t) => Field::Valid(t),
            Err(message) => Field::Invalid(message),
        })
    }
}

impl FromJson for String {
    fn from_json(v: &Value) -> Result<Self, String> {
        match v {
            Value::String(s) => Ok(s.clone()),
            _ => Err("must be a string".to_owned()),
        }
    }
}

/// A user id in a request or message: a positive integer (`7`, `7.0`) or a string of digits,
/// read by [`UserId`]'s own lenient rules. A type of its own for its OpenAPI schema, which
/// admits the string form that replies (plain [`UserId`]) never use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct UserIdInput(pub UserId);

impl FromJson for UserIdInput {
    fn from_json(v: &Value) -> Result<Self, String> {
        UserId::from_json(v)
            .map(UserIdInput)
            .ok_or_else(|| crate::domain::NotAUserId.to_string())
    }
}

impl utoipa::PartialSchema for UserIdInput {
    fn schema() -> RefOr<Schema> {
        OneOfBuilder::new()
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::Integer)
                    .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)))
                    .minimum(Some(1)),
            )
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .pattern(Some(r"^\s*0*[1-9][0-9]{0,17}\s*$")),
            )
            .description(Some("A positive integer, or a string of digits"))
            .into()
    }
}

impl utoipa::ToSchema for UserIdInput {}

/// An amount in a request or message: a decimal string or an exact JSON number (read digit for
/// digit, never through `f64`), at most two decimal places, at most 10^12, not negative.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MoneyInput(pub Money);

impl FromJson for MoneyInput {
    fn from_json(v: &Value) -> Result<Self, String> {
        match v {
            // With serde_json's `arbitrary_precision`, a number keeps its original digits.
            Value::Number(n) => Money::parse_non_negative(&n.to_string()),
            Value::String(s) => Money::parse_non_negative(s),
            _ => Err(MoneyError::WrongType),
        }
        .map(MoneyInput)
        .map_err(|e| e.to_string())
    }
}

impl utoipa::PartialSchema for MoneyInput {
    fn schema() -> RefOr<Schema> {
        OneOfBuilder::new()
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .pattern(Some(r"^\s*\+?[0-9]{1,13}(\.[0-9]{1,2})?\s*$"))
                    .examples(["2000.00"]),
            )
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::Number)
                    .minimum(Some(0))
                    .maximum(Some(1_000_000_000_000_i64))
                    .multiple_of(Some(0.01)),
            )
            .description(Some(
                "A decimal string or an exact JSON number, at most two decimal places, at most 10^12",
            ))
            .into()
    }
}

impl utoipa::ToSchema for MoneyInput {}

/// A timestamp in a request or message: an RFC 3339 string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timestamp(pub OffsetDateTime);

impl FromJson for Timestamp {
    fn from_json(v: &Value) -> Result<Self, String> {
        match v {
            Value::String(s) => OffsetDateTime::parse(s, &Rfc3339)
                .map(Timestamp)
                .map_err(|_| {
                    "must be an RFC 3339 timestamp such as 2026-11-20T10:00:00Z".to_owned()
                }),
            _ => Err("must be an RFC 3339 timestamp string".to_owned()),
        }
    }
}

impl utoipa::PartialSchema for Timestamp {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::DateTime)))
            .examples(["2026-11-20T10:00:00Z"])
            .into()
    }
}

impl utoipa::ToSchema for Timestamp {}

/// The content of a purchase (SPEC §3). `null` counts as absent; unknown fields are ignored.
/// Each field is read leniently (`Field`) and judged by `PurchaseMessage::validate`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, ToSchema)]
pub struct PurchaseContent {
    /// The buyer: an existing user.
    #[serde(default)]
    #[schema(value_type = UserIdInput, required = true)]
    pub buyer_id: Option<Field<UserIdInput>>,
    /// The purchase amount, positive.
    #[serde(default)]
    #[schema(value_type = MoneyInput, required = true)]
    pub amount: Option<Field<MoneyInput>>,
    /// The configured currency (default `INR`), case-insensitive; defaults to it.
    #[serde(default)]
    #[schema(value_type = Option<String>, example = "INR")]
    pub currency: Option<Field<String>>,
    /// When given, commissions are computed on it rather than on `amount`; 0 ≤ profit ≤ amount.
    #[serde(default)]
    #[schema(value_type = Option<MoneyInput>)]
    pub profit: Option<Field<MoneyInput>>,
    /// RFC 3339; defaults to the time of receipt.
    #[serde(default)]
    #[schema(value_type = Option<Timestamp>)]
    pub occurred_at: Option<Field<Timestamp>>,
}

/// The purchase message of SPEC §3, as published to exchange `upline.purchases` (routing key
/// `purchase`, persistent, `content_type: application/json`) by the api or by external
/// systems: the idempotency key and the `PurchaseContent`. `PurchaseMessage::validate` turns
/// it into a `Purchase`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, ToSchema)]
#[schema(example = json!({"purchase_id": "ord-2026-000123", "buyer_id": 42, "amount": "2000.00",
    "currency": "INR", "profit": "400.00", "occurred_at": "2026-11-20T10:00:00Z"}))]
pub struct PurchaseMessage {
    /// The idempotency key: 1–64 characters of `A-Za-z0-9._:-`.
    pub purchase_id: PurchaseId,
    #[serde(flatten)]
    pub content: PurchaseContent,
}

/// `POST /api/purchases`: the `PurchaseMessage` with `purchase_id` optional (then the
/// `Idempotency-Key` header names the purchase; one of them is required).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, ToSchema)]
#[schema(example = json!({"purchase_id": "ord-2026-000123", "buyer_id": 42, "amount": "2000.00",
    "currency": "INR", "profit": "400.00", "occurred_at": "2026-11-20T10:00:00Z"}))]
pub struct PurchaseRequest {
    /// The idempotency key: 1–64 characters of `A-Za-z0-9._:-`; else the `Idempotency-Key`
    /// header (they must agree when both are sent).
    #[serde(default)]
    #[schema(value_type = Option<String>, pattern = r"^[A-Za-z0-9._:-]{1,64}$")]
    pub purchase_id: Option<Field<String>>,
    #[serde(flatten)]
    pub content: PurchaseContent,
}

impl PurchaseRequest {
    /// The message to validate and publish, under the id the request settled on.
    pub fn into_message(self, purchase_id: PurchaseId) -> PurchaseMessage {
        PurchaseMessage {
            purchase_id,
            content: self.content,
        }
    }
}

impl PurchaseMessage {
    /// Validates the content against the rules (SPEC §2–3). Whether the buyer exists is for
    /// the caller to check.
    ///
    /// # Errors
    /// The first [`Invalid`] field, in the order `buyer_id`, `amount`, `currency`, `profit`,
    /// `occurred_at`.
    pub fn validate(self, rules: &Rules) -> Result<Purchase, Invalid> {
        let PurchaseMessage {
            purchase_id,
            content,
        } = self;
        let UserIdInput(buyer_id) = content
            .buyer_id
            .ok_or_else(|| Invalid::new("buyer_id", "is required"))?
            .get("buyer_id")?;
        let MoneyInput(amount) = content
            .amount
            .ok_or_else(|| Invalid::new("amount", "is required"))?
            .get("amount")?;
        if amount.is_zero() {
            return Err(Invalid::new("amount", MoneyError::NotPositive.to_string()));
        }
        let currency = match content.currency.map(|c| c.get("currency")).transpose()? {
            None => rules.currency.clone(),
            Some(c) if c.eq_ignore_ascii_case(&rules.currency) => rules.currency.clone(),
            Some(c) => {
                return Err(Invalid::new(
                    "currency",
                    format!("must be {}, found {c:?}", rules.currency),
                ))
            }
        };
        let profit = match content.profit.map(|p| p.get("profit")).transpose()? {
            None => None,
            Some(MoneyInput(p)) if p > amount => {
                return Err(Invalid::new("profit", "must not exceed amount"))
            }
            Some(MoneyInput(p)) => Some(p),
        };
        let occurred_at = content
            .occurred_at
            .map(|t| t.get("occurred_at"))
            .transpose()?
            .map(|Timestamp(t)| t);
        Ok(Purchase {
            purchase_id,
            buyer_id,
            amount,
            currency,
            profit,
            occurred_at,
        })
    }
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
            hold: std::time::Duration::ZERO,
        }
    }

    fn check(body: &str) -> Result<Purchase, Invalid> {
        let (message, _) = read(body.as_bytes()).expect("readable");
        message.validate(&rules())
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
        assert_eq!(
            field(r#"{"purchase_id":"p1","buyer_id":3,"amount":0}"#),
            "amount"
        );
    }

    #[test]
    fn the_first_bad_field_is_named_in_spec_order_with_its_message() {
        let invalid = check(
            r#"{"occurred_at":5,"profit":true,"currency":"USD","amount":"x","buyer_id":"-1","purchase_id":"p"}"#,
        )
        .unwrap_err();
        assert_eq!(invalid.to_string(), "buyer_id: must be a positive integer");
        let invalid = check(
            r#"{"occurred_at":5,"currency":7,"amount":"1.001","buyer_id":1,"purchase_id":"p"}"#,
        )
        .unwrap_err();
        assert_eq!(
            invalid.to_string(),
            "amount: must have at most 2 decimal places"
        );
        let invalid =
            check(r#"{"occurred_at":5,"currency":7,"amount":"1","buyer_id":1,"purchase_id":"p"}"#)
                .unwrap_err();
        assert_eq!(invalid.to_string(), "currency: must be a string");
        let invalid = check(r#"{"occurred_at":5,"amount":"1","buyer_id":"7","purchase_id":"p"}"#)
            .unwrap_err();
        assert_eq!(
            invalid.to_string(),
            "occurred_at: must be an RFC 3339 timestamp string"
        );
    }

    #[test]
    fn lenient_inputs_are_read_exactly() {
        let p = check(
            r#"{"purchase_id":"p","buyer_id":" 7 ","amount":999999999999.99,"profit":0,"currency":null}"#,
        )
        .expect("valid");
        assert_eq!(p.buyer_id.get(), 7);
        assert_eq!(p.amount.to_string(), "999999999999.99");
        assert_eq!(p.profit.map(|m| m.to_string()).as_deref(), Some("0.00"));
        assert_eq!(p.currency, "INR");
        assert_eq!(
            check(r#"{"purchase_id":"p","buyer_id":7.0,"amount":1}"#)
                .expect("valid")
                .buyer_id
                .get(),
            7
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
