//! Earning events (SPEC §4): one per credited commission, published to `upline.earnings` with
//! routing key `earning.<level>.<earner_id>` after the ledger commits.

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use time::OffsetDateTime;
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use utoipa::openapi::RefOr;
use utoipa::{PartialSchema, ToSchema};

use crate::money::Money;
use crate::{Level, UserId};

/// The wire format of an earning event (SPEC §4): one per credited commission, published at
/// least once to exchange `upline.earnings` (topic) with routing key
/// `earning.<level>.<earner_id>`, streamed by the notifier (SPEC §5, see
/// [`crate::protocol`]), and listed in `recent` of the earnings report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({"earning_id": 9812, "seq": 17, "earner_id": 7, "source_user_id": 42,
    "purchase_id": "ord-2026-000123", "level": 1, "rate": "0.05", "amount": "100.00",
    "currency": "INR", "totals": {"total": "1530.00", "level_1": "1400.00", "level_2": "130.00"},
    "created_at": "2026-11-20T10:00:00.123Z"}))]
pub struct EarningEvent {
    /// `earnings.id`.
    pub earning_id: i64,
    /// The earner's earning count: 1, 2, 3 … without gaps, in commit order.
    #[schema(minimum = 1)]
    pub seq: i64,
    pub earner_id: UserId,
    /// The buyer.
    pub source_user_id: UserId,
    pub purchase_id: String,
    /// 1 = the buyer's direct referrer.
    pub level: Level,
    /// As a decimal string, `"0.05"`.
    #[serde(with = "rust_decimal::serde::str")]
    #[schema(value_type = String, example = "0.05")]
    pub rate: Decimal,
    /// Credited rupees, a decimal string with two places.
    #[schema(value_type = String, example = "100.00")]
    pub amount: Money,
    #[schema(example = "INR")]
    pub currency: String,
    /// The earner's totals including this earning.
    pub totals: Totals,
    /// RFC 3339.
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
}

impl EarningEvent {
    /// The routing key on `upline.earnings`: `earning.<level>.<earner_id>`.
    pub fn routing_key(&self) -> String {
        format!("earning.{}.{}", self.level, self.earner_id)
    }
}

/// An earner's totals: overall and per level (`{"total": "…", "level_1": "…", …}`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Totals {
    pub total: Money,
    /// Level 1 first.
    pub levels: Vec<Money>,
}

impl Serialize for Totals {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(1 + self.levels.len()))?;
        map.serialize_entry("total", &self.total)?;
        for (i, level) in self.levels.iter().enumerate() {
            map.serialize_entry(&format!("level_{}", i + 1), level)?;
        }
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
                "The earner's totals including this earning: `total` and `level_1`, `level_2`, … \
                 for every configured level (decimal strings with two places).",
            ))
            .property("total", money())
            .required("total")
            .additional_properties(Some(money()))
            .examples([serde_json::json!(
                {"total": "1530.00", "level_1": "1400.00", "level_2": "130.00"}
            )])
            .into()
    }
}

impl ToSchema for Totals {}

impl<'de> Deserialize<'de> for Totals {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let map = BTreeMap::<String, Money>::deserialize(d)?;
        let total = map
            .get("total")
            .copied()
            .ok_or_else(|| serde::de::Error::missing_field("total"))?;
        let mut levels = Vec::new();
        while let Some(m) = map.get(&format!("level_{}", levels.len() + 1)) {
            levels.push(*m);
        }
        Ok(Totals { total, levels })
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
        assert_eq!(event.routing_key(), "earning.1.7");
        let back = serde_json::to_value(&event).expect("serialises");
        assert_eq!(back["amount"], "100.00");
        assert_eq!(back["rate"], "0.05");
        assert_eq!(back["totals"]["level_2"], "130.00");
    }
}
