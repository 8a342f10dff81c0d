//! The commission rules of SPEC §2 as pure functions: given a purchase and what is known of
//! the buyer's upline, decide each level's outcome. And the commission lifecycle of contract
//! §10: what each kind of ledger entry does to an earner's balances ([`Balances::apply`]),
//! what a refund may refund ([`refundable`]) and what it claws back from each commission
//! ([`reversal`]). No I/O; the worker's ledger supplies the inputs under row locks and stores
//! the result.

use rust_decimal::{Decimal, RoundingStrategy};
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
    /// The name shown in the API and stored in `purchase_levels.outcome` (every outcome but
    /// `paid`: a paid level is its earning, see the `purchase_level_outcomes` view).
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

/// The kind of a ledger entry (contract §10), the `kind` of an earning event. Entries are
/// never updated or deleted: every change to an earner's money is an entry of its own, with
/// its own `seq`.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    Deserialize,
    sqlx::Type,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
#[sqlx(type_name = "text", rename_all = "snake_case")]
pub enum EntryKind {
    /// A credited commission (positive amount), `pending` for the holding period.
    #[default]
    Commission,
    /// A clawback of (part of) a commission after a refund (negative amount).
    Reversal,
    /// A commission's holding period ended: its amount moved from `pending` to `approved`.
    Approval,
    /// A payout was marked paid: its amount moved from `approved` to `paid`.
    Payout,
}

impl EntryKind {
    /// The name stored in `earnings.kind` and sent as the event's `kind`.
    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::Commission => "commission",
            EntryKind::Reversal => "reversal",
            EntryKind::Approval => "approval",
            EntryKind::Payout => "payout",
        }
    }
}

/// Where a commission's money is: held, or free to pay out (contract §10). A commission paid
/// out stays `Approved` here: paying out moves balances, not commissions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommissionStatus {
    /// Within its holding period (`commission.hold_days`).
    Pending,
    /// Past it (or credited with no holding period).
    Approved,
}

/// An earner's money by state (contract §10), in rupees. `pending + approved + paid` is the
/// earner's `total` (net of reversals); `reversed` is everything ever clawed back. `approved`
/// goes below zero when money already paid out is clawed back; the next payouts recover it
/// first, because a payout pays the approved balance.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Balances {
    pub pending: Money,
    pub approved: Money,
    pub paid: Money,
    pub reversed: Money,
}

/// What one ledger entry does to an earner's [`Balances`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Movement {
    /// A new commission, into `pending` (or straight into `approved` with no holding period).
    Credit(CommissionStatus),
    /// A clawback from a commission in this status: out of `pending` (the reversal voids the
    /// held commission) or out of `approved` (which may go below zero if it was paid out).
    Reverse(CommissionStatus),
    /// The holding period ended: `pending` → `approved`.
    Approve,
    /// A payout line marked paid: `approved` → `paid`.
    PayOut,
}

impl Balances {
    /// `pending + approved + paid`: the earner's net total.
    pub fn total(self) -> Money {
        self.pending + self.approved + self.paid
    }

    /// Applies one entry moving `amount` (a magnitude: never negative).
    pub fn apply(&mut self, movement: Movement, amount: Money) {
        debug_assert!(!amount.is_negative(), "amounts moved are magnitudes");
        fn bucket(b: &mut Balances, status: CommissionStatus) -> &mut Money {
            match status {
                CommissionStatus::Pending => &mut b.pending,
                CommissionStatus::Approved => &mut b.approved,
            }
        }
        match movement {
            Movement::Credit(status) => *bucket(self, status) += amount,
            Movement::Reverse(status) => {
                *bucket(self, status) -= amount;
                self.reversed += amount;
            }
            Movement::Approve => {
                self.pending -= amount;
                self.approved += amount;
            }
            Movement::PayOut => {
                self.approved -= amount;
                self.paid += amount;
            }
        }
    }
}

/// Why a refund refunds nothing (contract §10); the text is the refund's stored `reason`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RefundRejection {
    #[error("amount: {requested} exceeds the {refundable} still refundable of the purchase's {purchase_amount}")]
    Exceeds {
        requested: Money,
        refundable: Money,
        purchase_amount: Money,
    },
    #[error("purchase_id: the purchase is refunded in full already")]
    NothingLeft,
}

/// How much a refund refunds: `requested`, or everything still refundable when it names no
/// amount. The refunds of a purchase never add up to more than its amount.
///
/// # Errors
/// [`RefundRejection`] when `requested` is above what remains, or nothing remains.
pub fn refundable(
    requested: Option<Money>,
    purchase_amount: Money,
    refunded_before: Money,
) -> Result<Money, RefundRejection> {
    let refundable = purchase_amount.saturating_sub(refunded_before);
    match requested {
        _ if refundable.is_zero() => Err(RefundRejection::NothingLeft),
        None => Ok(refundable),
        Some(requested) if requested > refundable => Err(RefundRejection::Exceeds {
            requested,
            refundable,
            purchase_amount,
        }),
        Some(requested) => Ok(requested),
    }
}

/// What a refund claws back from one commission: the commission's share of everything
/// refunded so far (`refunded_after`, this refund included, over the purchase's `amount`),
/// rounded half to even to the paisa, less what earlier refunds clawed back
/// (`reversed_before`, a magnitude). Rounding the running share rather than each refund's own
/// share makes the reversals of a fully refunded purchase add up to exactly the commission,
/// never a paisa more or less. Returns a magnitude; zero when nothing is due.
pub fn reversal(
    commission: Money,
    purchase_amount: Money,
    refunded_after: Money,
    reversed_before: Money,
) -> Money {
    if purchase_amount.is_zero() {
        return Money::ZERO;
    }
    let refunded = refunded_after.min(purchase_amount);
    let share = (commission.as_decimal() * refunded.as_decimal() / purchase_amount.as_decimal())
        .round_dp_with_strategy(2, RoundingStrategy::MidpointNearestEven);
    let due = Money::from_total(share) - reversed_before;
    if due.is_negative() {
        Money::ZERO
    } else {
        due
    }
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
            hold: std::time::Duration::ZERO,
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

    /// Contract §10: C buys for 2000.00 (B 100.00, A 20.00); a 500.00 refund claws back a
    /// quarter of each, and refunding the rest claws back exactly what remains.
    #[test]
    fn a_partial_refund_reverses_in_proportion_and_the_rest_reverses_the_remainder() {
        let amount = m("2000.00");
        let first = refundable(Some(m("500.00")), amount, Money::ZERO).expect("refundable");
        assert_eq!(
            reversal(m("100.00"), amount, first, Money::ZERO),
            m("25.00")
        );
        assert_eq!(reversal(m("20.00"), amount, first, Money::ZERO), m("5.00"));
        let rest = refundable(None, amount, first).expect("the rest");
        assert_eq!(rest, m("1500.00"));
        assert_eq!(
            reversal(m("100.00"), amount, first + rest, m("25.00")),
            m("75.00")
        );
        assert_eq!(
            reversal(m("20.00"), amount, first + rest, m("5.00")),
            m("15.00")
        );
    }

    /// 1000.30 pays 50.02 at level 1; refunded in thirds, the running share rounds to
    /// 16.67, 33.35, 50.02, so the reversals are 16.67 + 16.68 + 16.67 = 50.02 exactly.
    #[test]
    fn reversals_of_a_fully_refunded_purchase_add_up_to_the_commission_exactly() {
        let (commission, amount) = (m("50.02"), m("1000.30"));
        let mut refunded = Money::ZERO;
        let mut reversed = Money::ZERO;
        let mut each = Vec::new();
        for part in ["333.43", "333.43", "333.44"] {
            refunded += m(part);
            let r = reversal(commission, amount, refunded, reversed);
            reversed += r;
            each.push(r.to_string());
        }
        assert_eq!(each, ["16.67", "16.68", "16.67"]);
        assert_eq!(reversed, commission);
    }

    #[test]
    fn a_refund_beyond_what_remains_is_rejected_with_the_figures() {
        let amount = m("2000.00");
        let err = refundable(Some(m("600.00")), amount, m("1500.00")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "amount: 600.00 exceeds the 500.00 still refundable of the purchase's 2000.00"
        );
        assert_eq!(
            refundable(None, amount, amount),
            Err(RefundRejection::NothingLeft)
        );
        assert_eq!(
            refundable(Some(m("500.00")), amount, m("1500.00")),
            Ok(m("500.00"))
        );
    }

    /// The lifecycle on one earner: 100.00 held, approved, paid out, then clawed back in full
    /// after payout: approved goes to -100.00, and the total stays pending + approved + paid.
    #[test]
    fn balances_follow_a_commission_from_pending_to_paid_and_a_clawback_after_payout() {
        let mut b = Balances::default();
        b.apply(Movement::Credit(CommissionStatus::Pending), m("100.00"));
        assert_eq!((b.pending, b.total()), (m("100.00"), m("100.00")));
        b.apply(Movement::Approve, m("100.00"));
        assert_eq!((b.pending, b.approved), (Money::ZERO, m("100.00")));
        b.apply(Movement::PayOut, m("100.00"));
        assert_eq!((b.approved, b.paid), (Money::ZERO, m("100.00")));
        b.apply(Movement::Reverse(CommissionStatus::Approved), m("100.00"));
        assert_eq!(b.approved.to_string(), "-100.00");
        assert_eq!(
            (b.paid, b.reversed, b.total()),
            (m("100.00"), m("100.00"), Money::ZERO)
        );
        // The next 700.00 approved nets to 600.00 payable: the clawback is recovered first.
        b.apply(Movement::Credit(CommissionStatus::Approved), m("700.00"));
        assert_eq!(b.approved, m("600.00"));
    }

    #[test]
    fn a_reversal_of_a_held_commission_voids_it_without_touching_approved() {
        let mut b = Balances::default();
        b.apply(Movement::Credit(CommissionStatus::Pending), m("100.00"));
        b.apply(Movement::Reverse(CommissionStatus::Pending), m("25.00"));
        assert_eq!(
            (b.pending, b.approved, b.reversed),
            (m("75.00"), Money::ZERO, m("25.00"))
        );
        assert_eq!(b.total(), m("75.00"));
    }
}
