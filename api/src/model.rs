//! The api's request and reply types (SPEC §6). Requests derive `Deserialize` + `ToSchema` and
//! convert with `TryFrom` into what the handlers work with; replies derive `Serialize` +
//! `ToSchema`. The OpenAPI description is generated from these very types.
//!
//! Request fields are `Option`s where the old contract treats `null` as absent and names a
//! missing field in a 422 (`"is required"`); the `TryFrom` conversions check them in a fixed
//! order, so the field a problem names does not depend on the order of the JSON.

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use upline_common::events::EarningEvent;
use upline_common::money::Money;
use upline_common::purchase::{PurchaseId, UserIdInput};
use upline_common::rules::Outcome;
use upline_common::{Email, Level, PurchaseStatus, UserId};
use utoipa::ToSchema;

use crate::error::ApiError;
use crate::store;

// ---------------------------------------------------------------------------------------------
// Requests

/// `POST /api/users`. Give the referrer by `referral_code`, or by `referrer_id` with the admin
/// key only; not both (the server accepts both when they name the same user). `null` counts
/// as absent and unknown fields are ignored.
#[derive(Debug, Deserialize, ToSchema)]
#[schema(example = json!({"name": "Asha", "email": "asha@example.com", "referral_code": "K7QM2XPA"}))]
pub struct RegisterRequest {
    /// 1–100 characters (trimmed).
    #[serde(default, deserialize_with = "opt_string")]
    #[schema(value_type = String, required = true, min_length = 1, max_length = 100, pattern = r"\S")]
    pub name: Option<String>,
    /// Unique, compared case-insensitively.
    #[serde(default, deserialize_with = "opt_string")]
    #[schema(value_type = String, required = true, format = Email, max_length = 254)]
    pub email: Option<String>,
    /// The referrer's id: with the admin key only (`403 admin_only` otherwise).
    pub referrer_id: Option<UserIdInput>,
    /// The referrer's referral code (case-insensitive).
    #[serde(default, deserialize_with = "opt_string")]
    pub referral_code: Option<String>,
}

/// A registration that passed validation.
#[derive(Debug)]
pub struct NewUser {
    /// Trimmed, 1–100 characters.
    pub name: String,
    /// Trimmed, an email address.
    pub email: Email,
    pub referrer: ReferrerChoice,
}

impl TryFrom<RegisterRequest> for NewUser {
    type Error = ApiError;

    /// # Errors
    /// 422 naming `name` or `email`.
    fn try_from(r: RegisterRequest) -> Result<Self, ApiError> {
        Ok(NewUser {
            name: parse_name(r.name.as_deref())?,
            email: Email::parse(r.email.as_deref().unwrap_or_default())
                .map_err(|e| ApiError::validation("email", e.to_string()))?,
            referrer: ReferrerChoice::new(r.referrer_id, r.referral_code),
        })
    }
}

/// `PUT /api/users/{id}/referrer`: one of `referrer_id` (admin key only) or `referral_code`
/// (the server also accepts both when they name the same user); `null` counts as absent.
#[derive(Debug, Deserialize, ToSchema)]
#[schema(example = json!({"referral_code": "K7QM2XPA"}))]
pub struct SetReferrerRequest {
    /// The referrer's id: with the admin key only (`403 admin_only` otherwise).
    pub referrer_id: Option<UserIdInput>,
    /// The referrer's referral code (case-insensitive).
    #[serde(default, deserialize_with = "opt_string")]
    pub referral_code: Option<String>,
}

impl From<SetReferrerRequest> for ReferrerChoice {
    fn from(r: SetReferrerRequest) -> Self {
        ReferrerChoice::new(r.referrer_id, r.referral_code)
    }
}

/// How a request names a referrer: by id (admin key only) and/or by referral code (a blank
/// code counts as none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReferrerChoice {
    pub by_id: Option<UserId>,
    pub by_code: Option<String>,
}

impl ReferrerChoice {
    fn new(id: Option<UserIdInput>, code: Option<String>) -> Self {
        ReferrerChoice {
            by_id: id.map(|UserIdInput(id)| id),
            by_code: code.map(|c| c.trim().to_owned()).filter(|c| !c.is_empty()),
        }
    }
}

/// `PATCH /api/users/{id}`.
#[derive(Debug, Deserialize, ToSchema)]
#[schema(example = json!({"show_on_leaderboard": false}))]
pub struct UpdateUserRequest {
    /// `false` hides the user from the public leaderboard.
    #[serde(default, deserialize_with = "opt_bool")]
    #[schema(value_type = bool, required = true)]
    pub show_on_leaderboard: Option<bool>,
}

/// The settings change a `PATCH /api/users/{id}` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserUpdate {
    pub show_on_leaderboard: bool,
}

impl TryFrom<UpdateUserRequest> for UserUpdate {
    type Error = ApiError;

    /// # Errors
    /// 422 naming `show_on_leaderboard` when it is missing.
    fn try_from(r: UpdateUserRequest) -> Result<Self, ApiError> {
        r.show_on_leaderboard
            .map(|show_on_leaderboard| UserUpdate {
                show_on_leaderboard,
            })
            .ok_or_else(|| {
                ApiError::validation("show_on_leaderboard", "is required: true or false")
            })
    }
}

/// An optional string field: `null` counts as absent; another type is "must be a string".
fn opt_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    match serde_json::Value::deserialize(d)? {
        serde_json::Value::Null => Ok(None),
        serde_json::Value::String(s) => Ok(Some(s)),
        _ => Err(serde::de::Error::custom("must be a string")),
    }
}

/// An optional boolean field: `null` counts as absent; another type is "must be true or false".
fn opt_bool<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
    match serde_json::Value::deserialize(d)? {
        serde_json::Value::Null => Ok(None),
        serde_json::Value::Bool(b) => Ok(Some(b)),
        _ => Err(serde::de::Error::custom("must be true or false")),
    }
}

fn parse_name(name: Option<&str>) -> Result<String, ApiError> {
    let name = name.map(str::trim).unwrap_or_default();
    if name.is_empty() {
        return Err(ApiError::validation("name", "is required"));
    }
    if name.chars().count() > 100 {
        return Err(ApiError::validation(
            "name",
            "must be at most 100 characters",
        ));
    }
    Ok(name.to_owned())
}

// ---------------------------------------------------------------------------------------------
// Replies

/// `201` of `POST /api/users`: the user and its bearer token.
#[derive(Debug, Serialize, ToSchema)]
pub struct RegisteredUser {
    #[serde(flatten)]
    pub user: store::User,
    /// The user's bearer token (`user_token`), valid until `token_expires_at`
    /// (`auth.token_ttl`); renew it with `POST /api/users/{id}/token` before then.
    pub token: String,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub token_expires_at: OffsetDateTime,
}

/// A page of users, by id.
#[derive(Debug, Serialize, ToSchema)]
pub struct UserPage {
    pub items: Vec<store::User>,
    /// Pass as `cursor` for the next page; null on the last page.
    pub next_cursor: Option<String>,
}

/// Who the bearer of the credentials is (`GET /api/me`).
#[derive(Debug, Serialize, ToSchema)]
#[serde(tag = "role", rename_all = "snake_case")]
pub enum Me {
    /// The admin key.
    Admin,
    /// The purchase producers' key.
    Producer,
    /// A user's token, with the user.
    User { user: store::User },
}

/// A fresh token for a user.
#[derive(Debug, Serialize, ToSchema)]
pub struct IssuedToken {
    pub user_id: UserId,
    pub token: String,
    /// When the token stops being valid (RFC 3339).
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub expires_at: OffsetDateTime,
}

/// A user's earnings (`GET /api/users/{id}/earnings`, contract §4 and §10).
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"user_id": 7, "total": "1530.00", "count": 12,
    "pending": "230.00", "approved": "300.00", "paid": "1000.00", "reversed": "50.00",
    "by_level": {"1": "1400.00", "2": "130.00"},
    "by_referral": [{"source_user_id": 42, "name": "Ravi", "level": 1, "total": "100.00", "count": 1}],
    "by_leg": [{"leg_user_id": 42, "name": "Ravi", "total": "230.00", "count": 3,
        "by_level": {"1": "100.00", "2": "130.00"}}],
    "recent": [{"earning_id": 9812, "seq": 17, "earner_id": 7, "kind": "commission",
        "source_user_id": 42, "purchase_id": "ord-2026-000123", "level": 1, "rate": "0.05",
        "amount": "100.00", "currency": "INR", "totals": {"total": "1530.00", "level_1": "1400.00",
        "level_2": "130.00", "pending": "230.00", "approved": "300.00", "paid": "1000.00",
        "reversed": "50.00"},
        "created_at": "2026-11-20T10:00:00.123Z"}]}))]
pub struct EarningsReport {
    pub user_id: UserId,
    /// `pending + approved + paid`: every commission, net of reversals.
    pub total: Money,
    /// How many commissions.
    pub count: i64,
    /// Commissions within their holding period (`commission.hold_days`).
    pub pending: Money,
    /// Approved and not yet paid out; below zero after a clawback of money already paid out.
    #[schema(value_type = String, pattern = r"^-?[0-9]+\.[0-9]{2}$", example = "300.00")]
    pub approved: Money,
    /// Paid out: the lines of payouts marked paid.
    pub paid: Money,
    /// Everything clawed back by reversals after refunds (already taken out of `total`).
    pub reversed: Money,
    /// Total per level, every configured level listed (`"1"`, `"2"`, …), zero included; net
    /// of reversals.
    pub by_level: BTreeMap<String, Money>,
    /// The 100 largest sources: per buyer and level, largest first.
    pub by_referral: Vec<store::ReferralEarnings>,
    /// Per leg (a direct referral together with everyone below them), for each direct
    /// referral whose leg brought the user a commission: largest total first, then by
    /// `leg_user_id`.
    pub by_leg: Vec<LegEarnings>,
    /// The 20 latest ledger entries (commissions, reversals, approvals, payouts) as earning
    /// events, newest first.
    pub recent: Vec<EarningEvent>,
}

/// What one leg brought a user: the direct referral `leg_user_id` and everyone below them.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"leg_user_id": 42, "name": "Ravi", "total": "230.00", "count": 3,
    "by_level": {"1": "100.00", "2": "130.00"}}))]
pub struct LegEarnings {
    /// The direct referral heading the leg.
    pub leg_user_id: UserId,
    /// The direct referral's name (`erased user` once erased).
    pub name: String,
    /// Rupees from the whole leg, net of reversals.
    pub total: Money,
    /// How many commissions the leg brought.
    pub count: i64,
    /// Per level, every configured level listed (`"1"`, `"2"`, …), `"0.00"` where nothing:
    /// level 1 is the direct referral's own purchases, level 2 their referrals', and so on.
    pub by_level: BTreeMap<String, Money>,
}

impl LegEarnings {
    /// Folds the per (leg, level) rows of [`store::earnings_by_leg`] into one entry per leg,
    /// each listing `levels` levels (and any other level found), sorted by total, largest
    /// first, then by `leg_user_id`.
    pub fn from_rows(rows: Vec<store::LegLevelRow>, levels: usize) -> Vec<LegEarnings> {
        let mut legs: BTreeMap<UserId, LegEarnings> = BTreeMap::new();
        for row in rows {
            let leg = legs.entry(row.leg_user_id).or_insert_with(|| LegEarnings {
                leg_user_id: row.leg_user_id,
                name: row.name.clone(),
                total: Money::ZERO,
                count: 0,
                by_level: (1..=levels).map(|l| (l.to_string(), Money::ZERO)).collect(),
            });
            let amount = Money::from_total(row.total);
            leg.total += amount;
            leg.count += row.count;
            *leg.by_level
                .entry(row.level.to_string())
                .or_insert(Money::ZERO) += amount;
        }
        let mut legs: Vec<LegEarnings> = legs.into_values().collect();
        legs.sort_by(|a, b| {
            b.total
                .as_decimal()
                .cmp(&a.total.as_decimal())
                .then(a.leg_user_id.cmp(&b.leg_user_id))
        });
        legs
    }
}

/// A user's downline, two levels deep.
#[derive(Debug, Serialize, ToSchema)]
pub struct Referrals {
    pub user_id: UserId,
    /// Direct referrals, by id.
    pub level_1: Vec<store::Referral>,
    /// Their referrals, by id.
    pub level_2: Vec<store::Referral>,
}

/// `202` of `POST /api/purchases`.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"purchase_id": "ord-2026-000123", "status": "accepted"}))]
pub struct PurchaseAccepted {
    pub purchase_id: PurchaseId,
    pub status: Accepted,
}

/// Always `accepted`: RabbitMQ confirmed the message.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Accepted {
    Accepted,
}

/// What a purchase came to: `processed` or `rejected` as recorded, or `conflict` once the id
/// was received again with different content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ReportedStatus {
    Processed,
    Rejected,
    Conflict,
}

impl From<PurchaseStatus> for ReportedStatus {
    fn from(status: PurchaseStatus) -> Self {
        match status {
            PurchaseStatus::Processed => ReportedStatus::Processed,
            PurchaseStatus::Rejected => ReportedStatus::Rejected,
        }
    }
}

/// What a worker recorded for a purchase (`GET /api/purchases/{purchase_id}`).
#[derive(Debug, Serialize, ToSchema)]
pub struct PurchaseReport {
    pub purchase_id: String,
    /// `conflict` once the id was received again with different content.
    pub status: ReportedStatus,
    /// What the first message came to.
    pub original_status: PurchaseStatus,
    /// Why it was rejected: the field first (`"currency: must be INR, found \"USD\""`).
    pub reason: Option<String>,
    pub buyer_id: Option<UserId>,
    pub amount: Option<Money>,
    pub currency: Option<String>,
    pub profit: Option<Money>,
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub occurred_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub processed_at: OffsetDateTime,
    /// Every configured level, level 1 first (empty for a rejected purchase).
    pub levels: Vec<PurchaseLevel>,
    /// Later bodies that reused the id with other content (at most 100); they pay nothing.
    pub conflicts: Vec<PurchaseConflict>,
    /// Rupees refunded of the purchase so far, by the applied refunds (contract §10).
    pub refunded: Money,
    /// Every refund recorded for the purchase (applied, waiting or rejected), oldest first.
    pub refunds: Vec<crate::routes::refunds::RefundReport>,
}

/// One level's outcome of a purchase.
#[derive(Debug, Serialize, ToSchema)]
pub struct PurchaseLevel {
    pub level: Level,
    /// The upline member at this level; null when there is none.
    pub earner_id: Option<UserId>,
    pub outcome: Outcome,
    /// The configured rate, `"0.05"`.
    #[serde(serialize_with = "normalized")]
    #[schema(value_type = String, example = "0.05")]
    pub rate: Decimal,
    /// Credited rupees (`"0.00"` unless `paid` or `capped`).
    pub amount: Money,
    /// The earning, when one was credited.
    pub earning_id: Option<i64>,
}

/// A rate as its shortest decimal string (`0.050` → `"0.05"`).
fn normalized<S: serde::Serializer>(d: &Decimal, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&d.normalize())
}

/// A later message under the same purchase id with different content.
#[derive(Debug, Serialize, ToSchema)]
pub struct PurchaseConflict {
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub received_at: OffsetDateTime,
    /// The message body as received; null once past `privacy.raw_body_retention`.
    #[schema(value_type = Option<Object>)]
    pub body: Option<serde_json::Value>,
}

impl PurchaseReport {
    /// The report of what `store::purchase` found.
    pub fn new(
        p: store::PurchaseRow,
        levels: Vec<store::LevelRow>,
        conflicts: Vec<store::ConflictRow>,
    ) -> Self {
        let original_status = p.status;
        let status = if conflicts.is_empty() {
            original_status.into()
        } else {
            ReportedStatus::Conflict
        };
        let levels = levels
            .into_iter()
            .map(|l| PurchaseLevel {
                level: l.level,
                earner_id: l.earner_id,
                outcome: l.outcome,
                rate: l.rate,
                amount: Money::from_total(l.amount),
                earning_id: l.earning_id,
            })
            .collect();
        PurchaseReport {
            purchase_id: p.purchase_id,
            status,
            original_status,
            reason: p.reason,
            buyer_id: p.buyer_id,
            amount: p.amount.map(Money::from_total),
            currency: p.currency,
            profit: p.profit.map(Money::from_total),
            occurred_at: p.occurred_at,
            processed_at: p.processed_at,
            levels,
            conflicts: conflicts
                .into_iter()
                .map(|c| PurchaseConflict {
                    received_at: c.received_at,
                    body: c.body.map(|b| b.0),
                })
                .collect(),
            refunded: Money::ZERO,
            refunds: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn register(body: serde_json::Value) -> Result<NewUser, ApiError> {
        NewUser::try_from(serde_json::from_value::<RegisterRequest>(body).expect("deserializes"))
    }

    #[test]
    fn registration_names_the_first_bad_field_and_trims() {
        let field = |body| register(body).unwrap_err().field().map(str::to_owned);
        assert_eq!(
            field(serde_json::json!({"email": "x@example.com"})).as_deref(),
            Some("name")
        );
        assert_eq!(
            field(serde_json::json!({"name": " ", "email": "nope"})).as_deref(),
            Some("name")
        );
        assert_eq!(
            field(serde_json::json!({"name": "X", "email": "a@b"})).as_deref(),
            Some("email")
        );
        let user = register(
            serde_json::json!({"name": " Asha ", "email": " a@example.com ",
            "referrer_id": "7", "referral_code": "  "}),
        )
        .expect("valid");
        assert_eq!(
            (user.name.as_str(), user.email.as_str()),
            ("Asha", "a@example.com")
        );
        assert_eq!(
            user.referrer,
            ReferrerChoice {
                by_id: UserId::new(7),
                by_code: None
            }
        );
    }

    #[test]
    fn a_field_of_the_wrong_type_is_named_with_the_old_message() {
        let error = |body: serde_json::Value| {
            serde_path_to_error::deserialize::<_, RegisterRequest>(body)
                .map(|_| ())
                .unwrap_err()
        };
        let e = error(serde_json::json!({"name": 5}));
        assert_eq!(
            (e.path().to_string(), e.inner().to_string()),
            ("name".to_owned(), "must be a string".to_owned())
        );
        let e = error(serde_json::json!({"name": "X", "referrer_id": "abc"}));
        assert_eq!(
            (e.path().to_string(), e.inner().to_string()),
            (
                "referrer_id".to_owned(),
                "must be a positive integer".to_owned()
            )
        );
        let e = serde_path_to_error::deserialize::<_, UpdateUserRequest>(
            serde_json::json!({"show_on_leaderboard": "no"}),
        )
        .unwrap_err();
        assert_eq!(e.inner().to_string(), "must be true or false");
    }

    #[test]
    fn legs_list_every_level_and_sort_by_total_then_id() {
        let row = |leg: i64, name: &str, level: u8, total: &str, count: i64| store::LegLevelRow {
            leg_user_id: UserId::new(leg).expect("id"),
            name: name.to_owned(),
            level: Level::new(level).expect("level"),
            total: total.parse().expect("decimal"),
            count,
        };
        let legs = LegEarnings::from_rows(
            vec![
                row(3, "Chitra", 1, "50.5", 1),
                row(5, "Dev", 2, "30", 2),
                row(5, "Dev", 1, "20.5", 1),
                row(9, "Isha", 2, "100.00", 4),
            ],
            2,
        );
        let shown = serde_json::to_value(&legs).expect("serializes");
        assert_eq!(
            shown,
            serde_json::json!([
                {"leg_user_id": 9, "name": "Isha", "total": "100.00", "count": 4,
                 "by_level": {"1": "0.00", "2": "100.00"}},
                {"leg_user_id": 3, "name": "Chitra", "total": "50.50", "count": 1,
                 "by_level": {"1": "50.50", "2": "0.00"}},
                {"leg_user_id": 5, "name": "Dev", "total": "50.50", "count": 3,
                 "by_level": {"1": "20.50", "2": "30.00"}},
            ])
        );
    }

    #[test]
    fn show_on_leaderboard_is_required() {
        let update = |body| {
            UserUpdate::try_from(serde_json::from_value::<UpdateUserRequest>(body).expect("json"))
        };
        assert_eq!(
            update(serde_json::json!({"show_on_leaderboard": null}))
                .unwrap_err()
                .field(),
            Some("show_on_leaderboard")
        );
        assert!(
            !update(serde_json::json!({"show_on_leaderboard": false}))
                .expect("valid")
                .show_on_leaderboard
        );
    }
}
