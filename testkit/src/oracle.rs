//! The commission oracle: an independent recomputation of commissions for the demo, the
//! benchmarks and the end-to-end tests. SPEC §2 written out plainly over the referrer map and
//! active flags as stored, without the rules module or the ledger, to compare with what the
//! pipeline recorded; and the clawbacks of contract §10: whatever order a purchase's refunds
//! were applied in, each commission keeps its amount less its share of everything refunded,
//! rounded half to even.

use std::collections::HashMap;

use rust_decimal::{Decimal, RoundingStrategy};
use sqlx::PgPool;
use upline_common::config::Rules;

use crate::order::Order;

/// Expected commissions.
#[derive(Debug, Default)]
pub struct Expected {
    /// Level (1 = direct referrer) → total credited, before refunds.
    pub by_level: HashMap<i16, Decimal>,
    /// Earner → total, net of refunds.
    pub by_earner: HashMap<i64, Decimal>,
    /// Commissions that should exist.
    pub count: usize,
    /// Everything refunds should have clawed back.
    pub reversed: Decimal,
}

/// A refund as sent: the purchase and the amount (`None`: whatever remained).
#[derive(Debug, Clone)]
pub struct RefundOrder {
    pub purchase_id: String,
    pub amount: Option<Decimal>,
}

/// Recomputes what `purchases` should have paid under `rules`' rates and threshold (each
/// purchase id counted once; `rules.cap_per_level` is ignored).
///
/// # Errors
/// Database errors reading the users.
pub async fn recompute(
    db: &PgPool,
    purchases: &[Order],
    rules: &Rules,
) -> anyhow::Result<Expected> {
    recompute_with_refunds(db, purchases, &[], rules).await
}

/// Like [`recompute`], with `refunds` applied: the refunds of a purchase refund at most its
/// amount (a refund with no amount refunds the rest; refunds that would exceed the amount are
/// expected to be rejected and are left out, in the order given).
///
/// # Errors
/// Database errors reading the users.
pub async fn recompute_with_refunds(
    db: &PgPool,
    purchases: &[Order],
    refunds: &[RefundOrder],
    rules: &Rules,
) -> anyhow::Result<Expected> {
    let amounts: HashMap<&str, Decimal> = purchases
        .iter()
        .map(|p| (p.purchase_id.as_str(), p.amount))
        .collect();
    let mut refunded: HashMap<&str, Decimal> = HashMap::new();
    for r in refunds {
        let Some(&amount) = amounts.get(r.purchase_id.as_str()) else {
            continue;
        };
        let so_far = refunded.entry(r.purchase_id.as_str()).or_default();
        let left = amount - *so_far;
        match r.amount {
            None => *so_far = amount,
            Some(a) if a <= left => *so_far += a,
            Some(_) => {}
        }
    }
    let (rates, min_purchase) = (&rules.rates, rules.min_purchase.as_decimal());
    let users: Vec<(i64, Option<i64>, bool)> =
        sqlx::query_as("select id, referrer_id, is_active from users")
            .fetch_all(db)
            .await?;
    let users: HashMap<i64, (Option<i64>, bool)> =
        users.into_iter().map(|(id, r, a)| (id, (r, a))).collect();
    let mut seen = std::collections::HashSet::new();
    let mut expected = Expected::default();
    for p in purchases {
        if !seen.insert(p.purchase_id.as_str())
            || p.amount <= min_purchase
            || !users.contains_key(&p.buyer_id.get())
        {
            continue;
        }
        let base = p.profit.unwrap_or(p.amount);
        let mut current = p.buyer_id.get();
        for (i, rate) in rates.iter().enumerate() {
            let Some(referrer) = users.get(&current).and_then(|u| u.0) else {
                break;
            };
            current = referrer;
            let active = users.get(&referrer).is_some_and(|u| u.1);
            let amount =
                (base * rate).round_dp_with_strategy(2, RoundingStrategy::MidpointNearestEven);
            if active && !amount.is_zero() {
                *expected
                    .by_level
                    .entry(i16::try_from(i + 1).expect("at most 10 levels"))
                    .or_default() += amount;
                let back = refunded
                    .get(p.purchase_id.as_str())
                    .map_or(Decimal::ZERO, |r| {
                        (amount * r / p.amount)
                            .round_dp_with_strategy(2, RoundingStrategy::MidpointNearestEven)
                    });
                *expected.by_earner.entry(referrer).or_default() += amount - back;
                expected.reversed += back;
                expected.count += 1;
            }
        }
    }
    Ok(expected)
}

/// Compares the ledger (earnings of purchases whose id starts with `prefix`; `""` for all)
/// with `expected`, earner by earner, and each earner's running total and gap-free `seq`.
/// Returns the differences found, at most 10 described (empty: they agree).
///
/// # Errors
/// Database errors.
pub async fn compare(
    db: &PgPool,
    prefix: &str,
    expected: &Expected,
) -> anyhow::Result<Vec<String>> {
    let like = format!("{prefix}%");
    // Commissions and reversals change totals; approvals and payouts only move money
    // between states.
    let actual: Vec<(i64, Decimal)> = sqlx::query_as(
        "select earner_id, sum(amount) from earnings
         where purchase_id like $1 and kind in ('commission', 'reversal') group by 1",
    )
    .bind(&like)
    .fetch_all(db)
    .await?;
    let actual: HashMap<i64, Decimal> = actual.into_iter().collect();
    let mut differences = Vec::new();
    for (earner, want) in &expected.by_earner {
        let got = actual.get(earner).copied().unwrap_or_default();
        if got != *want {
            differences.push(format!("earner {earner}: expected {want}, recorded {got}"));
        }
    }
    for earner in actual
        .keys()
        .filter(|k| !expected.by_earner.contains_key(k))
    {
        differences.push(format!("earner {earner}: recorded earnings, expected none"));
    }
    // Every user has balances (seq -1 below when not); its seq counts its entries; its total
    // is its commissions less reversals; its states add up to the total; `reversed` and `paid`
    // are what its reversal and payout entries say.
    let broken: Vec<(i64, i64, i64)> = sqlx::query_as(
        r#"select u.id, coalesce(b.earnings_seq, -1), count(e.id)
           from users u left join earner_balances b on b.user_id = u.id
                left join earnings e on e.earner_id = u.id
           group by u.id, b.user_id
           having b.user_id is null
               or b.earnings_seq <> count(e.id)
               or b.total_earnings <> coalesce(sum(e.amount) filter (where e.kind in ('commission', 'reversal')), 0)
               or b.total_earnings <> b.pending_earnings + b.approved_earnings + b.paid_earnings
               or b.reversed_earnings <> -coalesce(sum(e.amount) filter (where e.kind = 'reversal'), 0)
               or b.paid_earnings <> coalesce(sum(e.amount) filter (where e.kind = 'payout'), 0)
           limit 10"#,
    )
    .fetch_all(db)
    .await?;
    for (id, seq, count) in broken {
        differences.push(format!(
            "user {id}: seq {seq} / total / states do not match its {count} ledger entries"
        ));
    }
    // No commission approved twice, none approved for more than it holds after reversals.
    let over_approved: Vec<(i64,)> = sqlx::query_as(
        r#"select c.id from earnings c
           where c.kind = 'commission' and c.purchase_id like $1
             and (select coalesce(sum(a.amount), 0) from earnings a where a.kind = 'approval' and a.refers_to = c.id)
                 > c.amount
           limit 10"#,
    )
    .bind(&like)
    .fetch_all(db)
    .await?;
    for (id,) in over_approved {
        differences.push(format!(
            "commission {id}: approved for more than it credited"
        ));
    }
    differences.truncate(10);
    Ok(differences)
}
