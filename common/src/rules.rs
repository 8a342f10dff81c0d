//! The commission rules of SPEC §2 as pure functions: given a purchase and what is known of
//! the buyer's upline, decide each level's outcome. No I/O; the worker's ledger supplies the
//! inputs under row locks and stores the result.

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

pub use crate::config::Rules;
use crate::money::Money;
use crate::{Level, UserId};

/// What one level of the upline got from a purchase (SPEC §6, `GET /api/purchases/{id}`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, sqlx::Type, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
#[sqlx(type_name = "text", rename_all = "snake_case")]
pub enum Outcome {
    /// The full commission was credited.
    Paid,
    /// Credited up to the per-level cap, less than the full commission.
    Capped,
    /// The purchase amount is not above `commission.min_purchase`, or the commission rounds
    /// to less than one paisa: nothing credited.
    BelowThreshold,
    /// The earner is inactive: the share is not paid to anyone.
    Inactive,
    /// The earner already reached the cap at this level.
    CapReached,
    /// The buyer's upline has no one at this level.
    NoReferrer,
}

impl Outcome {
    /// The name stored in `purchase_levels.outcome` and shown in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Paid => "paid",
            Outcome::Capped => "capped",
            Outcome::BelowThreshold => "below_threshold",
            Outcome::Inactive => "inactive",
            Outcome::CapReached => "cap_reached",
            Outcome::NoReferrer => "no_referrer",
        }
    }

    /// Whether this outcome credits money (and so creates an earning).
    pub fn credits(self) -> bool {
        matches!(self, Outcome::Paid | Outcome::Capped)
    }
}

/// One member of the buyer's upline as the ledger sees it under lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UplineMember {
    pub user_id: UserId,
    pub is_active: bool,
    /// What this member has earned so far at this member's level for this purchase.
    pub earned_at_level: Money,
}

/// The decision for one level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LevelShare {
    /// 1 = the buyer's direct referrer.
    pub level: Level,
    pub earner_id: Option<UserId>,
    pub rate: Decimal,
    pub outcome: Outcome,
    /// Credited amount; zero unless [`Outcome::credits`].
    pub amount: Money,
}

/// Decides every configured level's share of a purchase.
///
/// `amount` decides whether the purchase qualifies (strictly above `min_purchase`); `base` is
/// what the rate applies to (the amount, or the profit when the event carries one).
/// `upline[i]` is the member at level `i + 1`; a shorter slice means no referrer above.
/// Returns one [`LevelShare`] per configured rate, level 1 first.
pub fn shares(
    rules: &Rules,
    amount: Money,
    base: Money,
    upline: &[UplineMember],
) -> Vec<LevelShare> {
    let qualifies = amount > rules.min_purchase;
    rules
        .rates
        .iter()
        .zip(Level::up_to(rules.rates.len()))
        .map(|(&rate, level)| {
            let i = level.index();
            let share = |earner_id, outcome, amount| LevelShare {
                level,
                earner_id,
                rate,
                outcome,
                amount,
            };
            let Some(member) = upline.get(i) else {
                return share(None, Outcome::NoReferrer, Money::ZERO);
            };
            let earner = Some(member.user_id);
            if !qualifies {
                return share(earner, Outcome::BelowThreshold, Money::ZERO);
            }
            if !member.is_active {
                return share(earner, Outcome::Inactive, Money::ZERO);
            }
            let full = base.commission(rate);
            if full.is_zero() {
                return share(earner, Outcome::BelowThreshold, Money::ZERO);
            }
            match rules.cap_per_level {
                None => share(earner, Outcome::Paid, full),
                Some(cap) => {
                    let room = cap.saturating_sub(member.earned_at_level);
                    if room.is_zero() {
                        share(earner, Outcome::CapReached, Money::ZERO)
                    } else if full > room {
                        share(earner, Outcome::Capped, room)
                    } else {
                        share(earner, Outcome::Paid, full)
                    }
                }
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Rules {
        Rules {
            rates: vec![Decimal::new(5, 2), Decimal::new(1, 2)],
            min_purchase: Money::parse("1000.00").expect("valid"),
            cap_per_level: None,
            currency: "INR".into(),
        }
    }

    fn m(s: &str) -> Money {
        Money::parse_non_negative(s).expect("valid")
    }

    fn member(user_id: i64) -> UplineMember {
        UplineMember {
            user_id: UserId::new(user_id).expect("positive"),
            is_active: true,
            earned_at_level: Money::ZERO,
        }
    }

    fn paid(shares: &[LevelShare]) -> Vec<(Outcome, String)> {
        shares
            .iter()
            .map(|s| (s.outcome, s.amount.to_string()))
            .collect()
    }

    /// SPEC §2: C (referred by B, referred by A) buys for 2000.00 → B 100.00, A 20.00.
    #[test]
    fn spec_example_pays_five_and_one_percent() {
        let (a, b) = (1, 2);
        let s = shares(
            &rules(),
            m("2000.00"),
            m("2000.00"),
            &[member(b), member(a)],
        );
        assert_eq!(
            paid(&s),
            vec![
                (Outcome::Paid, "100.00".into()),
                (Outcome::Paid, "20.00".into())
            ]
        );
        assert_eq!(s[0].earner_id.map(UserId::get), Some(b));
        assert_eq!(s[1].earner_id.map(UserId::get), Some(a));
        assert_eq!(s[1].level.get(), 2);
    }

    #[test]
    fn exactly_one_thousand_earns_nothing() {
        let s = shares(
            &rules(),
            m("1000.00"),
            m("1000.00"),
            &[member(2), member(1)],
        );
        assert_eq!(paid(&s), vec![(Outcome::BelowThreshold, "0.00".into()); 2]);
    }

    #[test]
    fn one_paisa_over_the_threshold_qualifies_and_rounds_half_even() {
        // 1000.01 × 0.05 = 50.0005 → 50.00 ; × 0.01 = 10.0001 → 10.00
        let s = shares(
            &rules(),
            m("1000.01"),
            m("1000.01"),
            &[member(2), member(1)],
        );
        assert_eq!(
            paid(&s),
            vec![
                (Outcome::Paid, "50.00".into()),
                (Outcome::Paid, "10.00".into())
            ]
        );
    }

    #[test]
    fn a_midpoint_rounds_to_the_even_paisa() {
        // 1000.10 × 0.05 = 50.005 → 50.00; 1000.30 × 0.05 = 50.015 → 50.02
        let s = shares(&rules(), m("1000.10"), m("1000.10"), &[member(2)]);
        assert_eq!(s[0].amount.to_string(), "50.00");
        let s = shares(&rules(), m("1000.30"), m("1000.30"), &[member(2)]);
        assert_eq!(s[0].amount.to_string(), "50.02");
    }

    #[test]
    fn missing_upline_levels_are_no_referrer() {
        let s = shares(&rules(), m("5000"), m("5000"), &[member(2)]);
        assert_eq!(
            paid(&s),
            vec![
                (Outcome::Paid, "250.00".into()),
                (Outcome::NoReferrer, "0.00".into())
            ]
        );
        let s = shares(&rules(), m("5000"), m("5000"), &[]);
        assert!(s
            .iter()
            .all(|s| s.outcome == Outcome::NoReferrer && s.earner_id.is_none()));
    }

    #[test]
    fn an_inactive_referrer_is_skipped_and_the_level_above_still_pays() {
        let mut b = member(2);
        b.is_active = false;
        let s = shares(&rules(), m("2000"), m("2000"), &[b, member(1)]);
        assert_eq!(
            paid(&s),
            vec![
                (Outcome::Inactive, "0.00".into()),
                (Outcome::Paid, "20.00".into())
            ]
        );
    }

    #[test]
    fn profit_is_the_base_when_given_but_amount_decides_qualification() {
        let s = shares(&rules(), m("2000"), m("400"), &[member(2), member(1)]);
        assert_eq!(
            paid(&s),
            vec![
                (Outcome::Paid, "20.00".into()),
                (Outcome::Paid, "4.00".into())
            ]
        );
        let s = shares(&rules(), m("900"), m("400"), &[member(2)]);
        assert_eq!(s[0].outcome, Outcome::BelowThreshold);
    }

    #[test]
    fn a_commission_below_one_paisa_is_not_credited() {
        // 0.30 × 5 % = 0.015 → 0.02 ; 0.30 × 1 % = 0.003 → 0.00
        let s = shares(&rules(), m("2000"), m("0.30"), &[member(2), member(1)]);
        assert_eq!(
            paid(&s),
            vec![
                (Outcome::Paid, "0.02".into()),
                (Outcome::BelowThreshold, "0.00".into())
            ]
        );
    }

    #[test]
    fn the_cap_pays_up_to_the_cap_then_nothing() {
        let mut r = rules();
        r.cap_per_level = Some(m("120.00"));
        let mut b = member(2);
        b.earned_at_level = m("50.00");
        let s = shares(&r, m("2000"), m("2000"), &[b]);
        assert_eq!(
            (s[0].outcome, s[0].amount.to_string()),
            (Outcome::Capped, "70.00".into())
        );
        b.earned_at_level = m("120.00");
        let s = shares(&r, m("2000"), m("2000"), &[b]);
        assert_eq!(
            (s[0].outcome, s[0].amount.to_string()),
            (Outcome::CapReached, "0.00".into())
        );
        b.earned_at_level = m("20.00");
        let s = shares(&r, m("2000"), m("2000"), &[b]);
        assert_eq!(
            (s[0].outcome, s[0].amount.to_string()),
            (Outcome::Paid, "100.00".into())
        );
    }

    #[test]
    fn more_levels_follow_the_configured_rates() {
        let mut r = rules();
        r.rates.push(Decimal::new(5, 3));
        let s = shares(&r, m("2000"), m("2000"), &[member(3), member(2), member(1)]);
        assert_eq!(s.len(), 3);
        assert_eq!(s[2].amount.to_string(), "10.00");
    }
}
