//! Earning events (contract §4, §10): one per ledger entry (a commission, a reversal, an
//! approval, a payout), published to `upline.earnings` with routing key
//! `earning.<level>.<earner_id>` (`earning.payout.<earner_id>` for a payout) after the ledger
//! commits.

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use time::OffsetDateTime;
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use utoipa::openapi::RefOr;
use utoipa::{PartialSchema, ToSchema};

use crate::money::{self, Money};
use crate::rules::{Balances, EntryKind};
use crate::{Level, UserId};

/// The wire format of an earning event (contract §4, §10): one per ledger entry of the
/// earner's, published at least once to exchange `upline.earnings` (topic) with routing key
/// [`EarningEvent::routing_key`], streamed by the notifier (contract §5, see
/// [`crate::protocol`]), and listed in `recent` of the earnings report.
///
/// `kind` says what the entry is. A `commission` credits `amount`; a `reversal` claws back
/// (its `amount` is negative, `refers_to` names the commission, `refund_id` the refund); an
/// `approval` moves `amount` of the commission `refers_to` from `pending` to `approved`; a
/// `payout` moves `amount` from `approved` to `paid` (`payout_id`; no purchase, buyer, level
/// or rate). Only commissions and reversals change `totals.total`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({"earning_id": 9812, "seq": 17, "earner_id": 7, "kind": "commission",
    "source_user_id": 42, "purchase_id": "ord-2026-000123", "level": 1, "rate": "0.05",
    "amount": "100.00", "currency": "INR", "totals": {"total": "1530.00", "level_1": "1400.00",
    "level_2": "130.00", "pending": "230.00", "approved": "300.00", "paid": "1000.00",
    "reversed": "50.00"}, "created_at": "2026-11-20T10:00:00.123Z"}))]
pub struct EarningEvent {
    /// `earnings.id`.
    pub earning_id: i64,
    /// The earner's entry count: 1, 2, 3 … without gaps, in commit order, over every kind.
    #[schema(minimum = 1)]
    pub seq: i64,
    pub earner_id: UserId,
    /// What the entry is; events from before contract §10 carry none and are commissions.
    #[serde(default)]
    pub kind: EntryKind,
    /// The buyer; absent on a payout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_user_id: Option<UserId>,
    /// Absent on a payout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purchase_id: Option<String>,
    /// 1 = the buyer's direct referrer; absent on a payout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<Level>,
    /// As a decimal string, `"0.05"`; absent on a payout.
    #[serde(
        default,
        with = "rust_decimal::serde::str_option",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<String>, example = "0.05")]
    pub rate: Option<Decimal>,
    /// Rupees, a decimal string with two places: credited (commission), clawed back (reversal,
    /// negative), or moved between states (approval, payout).
    #[serde(deserialize_with = "money::signed")]
    #[schema(value_type = String, example = "100.00")]
    pub amount: Money,
    #[schema(example = "INR")]
    pub currency: String,
    /// Reversal and approval: the `earning_id` of the commission.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refers_to: Option<i64>,
    /// Reversal: the refund that caused it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refund_id: Option<String>,
    /// Payout: the payout batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payout_id: Option<i64>,
    /// The earner's totals including this entry.
    pub totals: Totals,
    /// RFC 3339.
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
}

impl EarningEvent {
    /// The routing key on `upline.earnings`: `earning.<level>.<earner_id>`, or
    /// `earning.payout.<earner_id>` for an entry with no level (a payout).
    pub fn routing_key(&self) -> String {
        match self.level {
            Some(level) => format!("earning.{level}.{}", self.earner_id),
            None => format!("earning.payout.{}", self.earner_id),
        }
    }
}

/// An earner's totals: overall, per level and by state (`{"total": "…", "level_1": "…", …,
/// "pending": "…", "approved": "…", "paid": "…", "reversed": "…"}`), contract §4 and §10.
/// `total` and the levels are net of reversals; `total = pending + approved + paid`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Totals {
    pub total: Money,
    /// Level 1 first.
    pub levels: Vec<Money>,
    /// By state; zero in events from before contract §10.
    pub balances: Balances,
}

impl Serialize for Totals {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(5 + self.levels.len()))?;
        map.serialize_entry("total", &self.total)?;
        for (i, level) in self.levels.iter().enumerate() {
            map.serialize_entry(&format!("level_{}", i + 1), level)?;
        }
        let b = &self.balances;
        map.serialize_entry("pending", &b.pending)?;
        map.serialize_entry("approved", &b.approved)?;
        map.serialize_entry("paid", &b.paid)?;
        map.serialize_entry("reversed", &b.reversed)?;
        map.end()
    }
}

impl PartialSchema for Totals {
    /// An object of decimal strings: `total`, then `level_1`, `level_2`, … for every
    /// configured level.
    fn schema() -> RefOr<Schema> {
        let money = || {
            ObjectBuilder::new()
                .schema_type(Type::String)
                .examples(["1530.00"])
        };
        ObjectBuilder::new()
            .description(Some(
                "The earner's totals including this entry: `total` and `level_1`, `level_2`, … \
                 for every configured level, net of reversals, and the money by state: \
                 `pending`, `approved` (below zero after a clawback of money paid out), `paid` \
                 and `reversed` (everything clawed back); `total = pending + approved + paid`. \
                 Decimal strings with two places.",
            ))
            .property("total", money())
            .required("total")
            .property("pending", money())
            .property("approved", money())
            .property("paid", money())
            .property("reversed", money())
            .additional_properties(Some(money()))
            .examples([serde_json::json!(
                {"total": "1530.00", "level_1": "1400.00", "level_2": "130.00",
                 "pending": "230.00", "approved": "300.00", "paid": "1000.00", "reversed": "50.00"}
            )])
            .into()
    }
}

impl ToSchema for Totals {}

impl<'de> Deserialize<'de> for Totals {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = BTreeMap::<String, String>::deserialize(d)?;
        let map = raw
            .into_iter()
            .map(|(k, v)| Money::parse_signed(&v).map(|m| (k, m)))
            .collect::<Result<BTreeMap<String, Money>, _>>()
            .map_err(serde::de::Error::custom)?;
        let total = map
            .get("total")
            .copied()
            .ok_or_else(|| serde::de::Error::missing_field("total"))?;
        let mut levels = Vec::new();
        while let Some(m) = map.get(&format!("level_{}", levels.len() + 1)) {
            levels.push(*m);
        }
        let get = |k: &str| map.get(k).copied().unwrap_or_default();
        let balances = Balances {
            pending: get("pending"),
            approved: get("approved"),
            paid: get("paid"),
            reversed: get("reversed"),
        };
        Ok(Totals {
            total,
            levels,
            balances,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_spec_example_event_round_trips() {
        let text = r#"{"earning_id":9812,"seq":17,"earner_id":7,"source_user_id":42,
            "purchase_id":"ord-2026-000123","level":1,"rate":"0.05","amount":"100.00","currency":"INR",
            "totals":{"total":"1530.00","level_1":"1400.00","level_2":"130.00"},
            "created_at":"2026-11-20T10:00:00.123Z"}"#;
        let event: EarningEvent = serde_json::from_str(text).expect("valid event");
        assert_eq!(event.totals.levels.len(), 2);
        assert_eq!(event.kind, EntryKind::Commission);
        assert_eq!(event.routing_key(), "earning.1.7");
        let back = serde_json::to_value(&event).expect("serialises");
        assert_eq!(back["amount"], "100.00");
        assert_eq!(back["rate"], "0.05");
        assert_eq!(back["totals"]["level_2"], "130.00");
    }

    #[test]
    fn a_reversal_after_payout_carries_negative_amounts_and_round_trips() {
        let text = r#"{"earning_id":9900,"seq":18,"earner_id":7,"kind":"reversal","source_user_id":42,
            "purchase_id":"ord-2026-000123","level":1,"rate":"0.05","amount":"-100.00","currency":"INR",
            "refers_to":9812,"refund_id":"rf-1",
            "totals":{"total":"1430.00","level_1":"1300.00","level_2":"130.00","pending":"0.00",
                      "approved":"-100.00","paid":"1530.00","reversed":"100.00"},
            "created_at":"2026-11-21T10:00:00Z"}"#;
        let event: EarningEvent = serde_json::from_str(text).expect("valid event");
        assert_eq!(event.kind, EntryKind::Reversal);
        assert_eq!(event.amount.to_string(), "-100.00");
        assert_eq!(event.totals.balances.approved.to_string(), "-100.00");
        assert_eq!(event.totals.balances.total(), event.totals.total);
        let back = serde_json::to_value(&event).expect("serialises");
        assert_eq!(back["kind"], "reversal");
        assert_eq!(back["totals"]["approved"], "-100.00");
        assert_eq!(back["refund_id"], "rf-1");
        assert!(back.get("payout_id").is_none());
    }

    #[test]
    fn a_payout_has_no_level_and_routes_by_earner() {
        let text = r#"{"earning_id":9901,"seq":19,"earner_id":7,"kind":"payout","amount":"600.00",
            "currency":"INR","payout_id":3,"totals":{"total":"1430.00","level_1":"1300.00",
            "level_2":"130.00","pending":"0.00","approved":"0.00","paid":"1430.00","reversed":"100.00"},
            "created_at":"2026-11-22T10:00:00Z"}"#;
        let event: EarningEvent = serde_json::from_str(text).expect("valid event");
        assert_eq!(event.routing_key(), "earning.payout.7");
        let back = serde_json::to_value(&event).expect("serialises");
        assert!(back.get("level").is_none() && back.get("rate").is_none());
    }
}
