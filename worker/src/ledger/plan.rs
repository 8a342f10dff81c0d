//! The pure middle of a ledger batch: given the claimed purchases, their buyers' uplines and
//! the locked earners as loaded, decide every level's outcome, the earnings to write (each with
//! the earner's next `seq` and running totals) and the earners' new state. No I/O: the ledger
//! loads the inputs under row locks and writes the [`Plan`] back; the tests below exercise it
//! on in-memory data.

use std::collections::{BTreeMap, HashMap};

use rust_decimal::Decimal;
use upline_common::events::{EarningEvent, Totals};
use upline_common::money::Money;
use upline_common::purchase::Purchase;
use upline_common::rules::{
    self, Balances, CommissionStatus, EntryKind, Movement, Outcome, Rules, UplineMember,
};
use upline_common::{Level, UserId};

/// A buyer's upline: level 1 (the direct referrer) first, at most `rules.rates.len()` long.
/// A buyer with no referrer has an empty upline; an unknown buyer has none at all.
pub(super) type Upline = Vec<UserId>;

/// A locked earner: its `earner_balances` row, `users.is_active` and its per-level totals,
/// updated as the batch is
/// planned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Earner {
    pub is_active: bool,
    /// `earner_balances.earnings_seq`: the `seq` of the earner's latest earning.
    pub seq: i64,
    /// `earner_balances.total_earnings`.
    pub total: Money,
    /// `earner_levels.total` per configured level, level 1 first.
    pub levels: Vec<Money>,
    /// `earner_balances.pending_earnings`, `approved_earnings`, `paid_earnings`, `reversed_earnings`.
    pub balances: Balances,
    /// Whether the batch credited this earner (its row must be written back).
    pub changed: bool,
}

impl Earner {
    /// An earner as loaded, with nothing earned at any of `levels` levels yet.
    pub fn new(is_active: bool, seq: i64, total: Money, levels: usize) -> Earner {
        Earner {
            is_active,
            seq,
            total,
            levels: vec![Money::ZERO; levels],
            balances: Balances::default(),
            changed: false,
        }
    }
}

/// One earning to insert into `earnings` (and queue in `earning_outbox`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct NewEarning {
    pub earner_id: UserId,
    /// The earner's `seq` for this earning: one more than its previous earning's.
    pub seq: i64,
    pub source_user_id: UserId,
    pub purchase_id: String,
    pub level: Level,
    pub rate: Decimal,
    pub amount: Money,
    pub currency: String,
    /// Held (`pending`) for `rules.hold`, or approved at once.
    pub status: CommissionStatus,
    /// The earner's totals including this earning (SPEC §4 `totals`).
    pub totals: Totals,
}

impl NewEarning {
    /// The contract §4 event of this earning once inserted as `earnings.id` = `id` at
    /// `created_at`: the same event the relay builds from the stored row.
    pub fn event(&self, id: i64, created_at: time::OffsetDateTime) -> EarningEvent {
        EarningEvent {
            earning_id: id,
            seq: self.seq,
            earner_id: self.earner_id,
            kind: EntryKind::Commission,
            source_user_id: Some(self.source_user_id),
            purchase_id: Some(self.purchase_id.clone()),
            level: Some(self.level),
            rate: Some(self.rate.normalize()),
            amount: self.amount,
            currency: self.currency.clone(),
            refers_to: None,
            refund_id: None,
            payout_id: None,
            totals: self.totals.clone(),
            created_at,
        }
    }
}

/// What one level of a purchase came to; the ledger stores the ones not `paid` in
/// `purchase_levels`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct LevelOutcome {
    pub purchase_id: String,
    pub level: Level,
    pub earner_id: Option<UserId>,
    pub outcome: Outcome,
    pub rate: Decimal,
    pub amount: Money,
    /// Index into [`Plan::earnings`], when this level credited one.
    pub earning: Option<usize>,
}

/// What one claimed purchase comes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Decision {
    /// Processed: its levels are in [`Plan::levels`]; `earnings` of them credited.
    Processed { earnings: usize },
    /// The buyer is not a user: the purchase is stored as rejected with this reason.
    UnknownBuyer { reason: String },
}

/// Everything a batch writes, decided in memory.
#[derive(Debug)]
pub(super) struct Plan {
    /// One per purchase, in the order given.
    pub decisions: Vec<Decision>,
    /// In the order credited: purchase by purchase, level by level.
    pub earnings: Vec<NewEarning>,
    pub levels: Vec<LevelOutcome>,
    /// Every locked earner with its state after the batch.
    pub earners: HashMap<UserId, Earner>,
}

/// Applies the rules purchase by purchase, in the order given: an earner's `seq`, totals and
/// caps carry from one purchase of the batch to the next. A purchase whose buyer has no entry
/// in `uplines` is decided [`Decision::UnknownBuyer`] and touches nothing else. A member of an
/// upline missing from `earners` counts as inactive.
pub(super) fn plan(
    rules: &Rules,
    purchases: &[&Purchase],
    uplines: &HashMap<UserId, Upline>,
    mut earners: HashMap<UserId, Earner>,
) -> Plan {
    let status = if rules.hold.is_zero() {
        CommissionStatus::Approved
    } else {
        CommissionStatus::Pending
    };
    let mut decisions = Vec::with_capacity(purchases.len());
    let mut earnings: Vec<NewEarning> = Vec::new();
    let mut levels = Vec::new();
    for p in purchases {
        let Some(upline) = uplines.get(&p.buyer_id) else {
            decisions.push(Decision::UnknownBuyer {
                reason: format!("buyer_id: no user with id {}", p.buyer_id),
            });
            continue;
        };
        let members: Vec<UplineMember> = upline
            .iter()
            .zip(Level::up_to(upline.len()))
            .map(|(id, level)| {
                let e = earners.get(id);
                UplineMember {
                    user_id: *id,
                    is_active: e.is_some_and(|e| e.is_active),
                    earned_at_level: e
                        .and_then(|e| e.levels.get(level.index()).copied())
                        .unwrap_or(Money::ZERO),
                }
            })
            .collect();
        let mut credited = 0;
        for share in rules::shares(rules, p.amount, p.commission_base(), &members) {
            let earner = share
                .earner_id
                .filter(|_| share.outcome.credits())
                .and_then(|id| earners.get_mut(&id).map(|e| (id, e)));
            let earning = earner.map(|(earner_id, earner)| {
                earner.seq += 1;
                earner.total += share.amount;
                earner.levels[share.level.index()] += share.amount;
                earner
                    .balances
                    .apply(Movement::Credit(status), share.amount);
                earner.changed = true;
                earnings.push(NewEarning {
                    earner_id,
                    seq: earner.seq,
                    source_user_id: p.buyer_id,
                    purchase_id: p.purchase_id.as_str().to_owned(),
                    level: share.level,
                    rate: share.rate,
                    amount: share.amount,
                    currency: p.currency.clone(),
                    status,
                    totals: Totals {
                        total: earner.total,
                        levels: earner.levels.clone(),
                        balances: earner.balances,
                    },
                });
                credited += 1;
                earnings.len() - 1
            });
            levels.push(LevelOutcome {
                purchase_id: p.purchase_id.as_str().to_owned(),
                level: share.level,
                earner_id: share.earner_id,
                outcome: share.outcome,
                rate: share.rate,
                amount: share.amount,
                earning,
            });
        }
        decisions.push(Decision::Processed { earnings: credited });
    }
    Plan {
        decisions,
        earnings,
        levels,
        earners,
    }
}

/// A sum of earnings and how many there were.
pub(super) type Sum = (Decimal, i64);

impl Plan {
    /// The earners the batch credited, with their new `seq` and total.
    pub fn changed_earners(&self) -> impl Iterator<Item = (UserId, &Earner)> {
        self.earners
            .iter()
            .filter(|(_, e)| e.changed)
            .map(|(id, e)| (*id, e))
    }

    /// What the batch adds to `earner_levels`, per (earner, level).
    pub fn level_sums(&self) -> BTreeMap<(UserId, Level), Sum> {
        let mut sums: BTreeMap<(UserId, Level), Sum> = BTreeMap::new();
        for e in &self.earnings {
            add(sums.entry((e.earner_id, e.level)).or_default(), e.amount);
        }
        sums
    }

    /// What the batch adds to `earner_referrals`, per (earner, buyer, level).
    pub fn referral_sums(&self) -> BTreeMap<(UserId, UserId, Level), Sum> {
        let mut sums: BTreeMap<(UserId, UserId, Level), Sum> = BTreeMap::new();
        for e in &self.earnings {
            add(
                sums.entry((e.earner_id, e.source_user_id, e.level))
                    .or_default(),
                e.amount,
            );
        }
        sums
    }
}

fn add(sum: &mut Sum, amount: Money) {
    sum.0 += amount.as_decimal();
    sum.1 += 1;
}

#[cfg(test)]
mod tests {
    use super::*;
    use upline_common::purchase::PurchaseId;

    /// 5 % to level 1, 1 % to level 2 (SPEC §2's example), no cap unless a test sets one.
    fn rules(cap: Option<&str>) -> Rules {
        Rules {
            rates: vec![Decimal::new(5, 2), Decimal::new(1, 2)],
            min_purchase: m("1000.00"),
            cap_per_level: cap.map(m),
            currency: "INR".into(),
            hold: std::time::Duration::from_secs(30 * 86_400),
        }
    }

    fn m(s: &str) -> Money {
        Money::parse_non_negative(s).expect("valid money")
    }

    fn id(n: i64) -> UserId {
        UserId::new(n).expect("positive")
    }

    fn purchase(purchase_id: &str, buyer: i64, amount: &str) -> Purchase {
        Purchase {
            purchase_id: PurchaseId::parse(purchase_id).expect("valid id"),
            buyer_id: id(buyer),
            amount: m(amount),
            currency: "INR".into(),
            profit: None,
            occurred_at: None,
        }
    }

    /// A (1) refers B (2) refers C (3); D (4) refers nobody.
    fn uplines() -> HashMap<UserId, Upline> {
        HashMap::from([
            (id(2), vec![id(1)]),
            (id(3), vec![id(2), id(1)]),
            (id(4), vec![]),
        ])
    }

    /// A and B as loaded: A has 3 earnings (seq 3) worth 30.00 at level 1; B none.
    fn earners() -> HashMap<UserId, Earner> {
        let mut a = Earner::new(true, 3, m("30.00"), 2);
        a.levels[0] = m("30.00");
        HashMap::from([(id(1), a), (id(2), Earner::new(true, 0, Money::ZERO, 2))])
    }

    /// C buys, then B, then C again.
    fn three_purchases() -> [Purchase; 3] {
        [
            purchase("p1", 3, "2000.00"),
            purchase("p2", 2, "1500.00"),
            purchase("p3", 3, "3000.00"),
        ]
    }

    fn run(rules: &Rules, purchases: &[Purchase], earners: HashMap<UserId, Earner>) -> Plan {
        let purchases: Vec<&Purchase> = purchases.iter().collect();
        plan(rules, &purchases, &uplines(), earners)
    }

    /// (earner, seq, level, amount) of each earning, in order.
    fn earned(plan: &Plan) -> Vec<(i64, i64, u8, String)> {
        plan.earnings
            .iter()
            .map(|e| {
                (
                    e.earner_id.get(),
                    e.seq,
                    e.level.get(),
                    e.amount.to_string(),
                )
            })
            .collect()
    }

    fn outcomes(plan: &Plan, purchase_id: &str) -> Vec<(Outcome, String)> {
        plan.levels
            .iter()
            .filter(|l| l.purchase_id == purchase_id)
            .map(|l| (l.outcome, l.amount.to_string()))
            .collect()
    }

    #[test]
    fn seq_numbers_each_earner_on_from_its_stored_seq_across_the_batch() {
        let plan = run(&rules(None), &three_purchases(), earners());
        assert_eq!(
            earned(&plan),
            vec![
                (2, 1, 1, "100.00".into()),
                (1, 4, 2, "20.00".into()),
                (1, 5, 1, "75.00".into()),
                (2, 2, 1, "150.00".into()),
                (1, 6, 2, "30.00".into()),
            ]
        );
        assert_eq!(
            plan.decisions,
            vec![
                Decision::Processed { earnings: 2 },
                Decision::Processed { earnings: 1 },
                Decision::Processed { earnings: 2 },
            ]
        );
        assert_eq!(plan.earners[&id(1)].seq, 6);
        assert_eq!(plan.earners[&id(2)].seq, 2);
        // Every level of every purchase has a row; level 2 of p2 has no referrer.
        assert_eq!(plan.levels.len(), 6);
        assert_eq!(
            outcomes(&plan, "p2"),
            vec![
                (Outcome::Paid, "75.00".into()),
                (Outcome::NoReferrer, "0.00".into())
            ]
        );
        let credited: Vec<Option<usize>> = plan.levels.iter().map(|l| l.earning).collect();
        assert_eq!(
            credited,
            vec![Some(0), Some(1), Some(2), None, Some(3), Some(4)]
        );
    }

    #[test]
    fn totals_run_per_level_and_sum_per_level_and_referral() {
        let plan = run(&rules(None), &three_purchases(), earners());
        // A's running totals: its stored 30.00 at level 1, then each earning added.
        let a: Vec<(String, Vec<String>)> = plan
            .earnings
            .iter()
            .filter(|e| e.earner_id == id(1))
            .map(|e| {
                (
                    e.totals.total.to_string(),
                    e.totals.levels.iter().map(Money::to_string).collect(),
                )
            })
            .collect();
        assert_eq!(
            a,
            vec![
                ("50.00".into(), vec!["30.00".into(), "20.00".into()]),
                ("125.00".into(), vec!["105.00".into(), "20.00".into()]),
                ("155.00".into(), vec!["105.00".into(), "50.00".into()]),
            ]
        );
        let b = &plan.earners[&id(2)];
        assert_eq!(b.total, m("250.00"));
        assert_eq!(b.levels, vec![m("250.00"), Money::ZERO]);

        let levels: Vec<((i64, u8), (String, i64))> = plan
            .level_sums()
            .into_iter()
            .map(|((e, l), (sum, n))| ((e.get(), l.get()), (sum.to_string(), n)))
            .collect();
        assert_eq!(
            levels,
            vec![
                ((1, 1), ("75.00".into(), 1)),
                ((1, 2), ("50.00".into(), 2)),
                ((2, 1), ("250.00".into(), 2)),
            ]
        );
        let referrals: Vec<(i64, i64, u8, String, i64)> = plan
            .referral_sums()
            .into_iter()
            .map(|((e, s, l), (sum, n))| (e.get(), s.get(), l.get(), sum.to_string(), n))
            .collect();
        assert_eq!(
            referrals,
            vec![
                (1, 2, 1, "75.00".into(), 1),
                (1, 3, 2, "50.00".into(), 2),
                (2, 3, 1, "250.00".into(), 2),
            ]
        );
        let mut changed: Vec<i64> = plan.changed_earners().map(|(id, _)| id.get()).collect();
        changed.sort_unstable();
        assert_eq!(changed, vec![1, 2]);
    }

    #[test]
    fn the_cap_carries_across_purchases_of_one_batch() {
        // Cap 120.00 per level. B earns 100.00 at level 1 per 2000.00, A already has 30.00
        // at level 1 and earns 75.00 per 1500.00 from B.
        let plan = run(
            &rules(Some("120.00")),
            &[
                purchase("p1", 3, "2000.00"),
                purchase("p2", 3, "2000.00"),
                purchase("p3", 3, "2000.00"),
                purchase("p4", 2, "1500.00"),
                purchase("p5", 2, "1500.00"),
            ],
            earners(),
        );
        assert_eq!(outcomes(&plan, "p1")[0], (Outcome::Paid, "100.00".into()));
        assert_eq!(outcomes(&plan, "p2")[0], (Outcome::Capped, "20.00".into()));
        assert_eq!(
            outcomes(&plan, "p3")[0],
            (Outcome::CapReached, "0.00".into())
        );
        assert_eq!(outcomes(&plan, "p4")[0], (Outcome::Paid, "75.00".into()));
        assert_eq!(outcomes(&plan, "p5")[0], (Outcome::Capped, "15.00".into()));
        assert_eq!(plan.earners[&id(2)].levels[0], m("120.00"));
        assert_eq!(plan.earners[&id(1)].levels[0], m("120.00"));
        assert_eq!(
            plan.decisions[2],
            Decision::Processed { earnings: 1 },
            "p3 still pays A at level 2"
        );
    }

    #[test]
    fn inactive_and_unloaded_earners_are_not_paid() {
        let mut loaded = earners();
        loaded.get_mut(&id(2)).expect("B is loaded").is_active = false;
        loaded.remove(&id(1));
        let plan = run(&rules(None), &[purchase("p1", 3, "2000.00")], loaded);
        assert_eq!(
            outcomes(&plan, "p1"),
            vec![
                (Outcome::Inactive, "0.00".into()),
                (Outcome::Inactive, "0.00".into())
            ]
        );
        assert!(plan.earnings.is_empty());
        assert_eq!(plan.decisions, vec![Decision::Processed { earnings: 0 }]);
        assert_eq!(plan.changed_earners().count(), 0);
        let earners: Vec<Option<i64>> = plan
            .levels
            .iter()
            .map(|l| l.earner_id.map(UserId::get))
            .collect();
        assert_eq!(earners, vec![Some(2), Some(1)]);
    }

    #[test]
    fn an_unknown_buyer_is_rejected_without_touching_the_rest_of_the_batch() {
        let plan = run(
            &rules(None),
            &[
                purchase("p1", 3, "2000.00"),
                purchase("p2", 99, "2000.00"),
                purchase("p3", 4, "2000.00"),
                purchase("p4", 3, "2000.00"),
            ],
            earners(),
        );
        assert_eq!(
            plan.decisions,
            vec![
                Decision::Processed { earnings: 2 },
                Decision::UnknownBuyer {
                    reason: "buyer_id: no user with id 99".into()
                },
                Decision::Processed { earnings: 0 },
                Decision::Processed { earnings: 2 },
            ]
        );
        assert!(outcomes(&plan, "p2").is_empty());
        assert_eq!(
            outcomes(&plan, "p3"),
            vec![
                (Outcome::NoReferrer, "0.00".into()),
                (Outcome::NoReferrer, "0.00".into())
            ]
        );
        assert_eq!(
            earned(&plan),
            vec![
                (2, 1, 1, "100.00".into()),
                (1, 4, 2, "20.00".into()),
                (2, 2, 1, "100.00".into()),
                (1, 5, 2, "20.00".into()),
            ]
        );
    }

    #[test]
    fn a_purchase_at_or_below_the_minimum_pays_nothing() {
        let plan = run(&rules(None), &[purchase("p1", 3, "1000.00")], earners());
        assert_eq!(
            outcomes(&plan, "p1"),
            vec![
                (Outcome::BelowThreshold, "0.00".into()),
                (Outcome::BelowThreshold, "0.00".into())
            ]
        );
        assert!(plan.earnings.is_empty());
    }
}
