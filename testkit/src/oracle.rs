//! The commission oracle: an independent recomputation of commissions for the demo, the
//! benchmarks and the end-to-end tests. SPEC §2 written out plainly over the referrer map and
//! active flags as stored, without the rules module or the ledger, to compare with what the
//! pipeline recorded.

use std::collections::HashMap;

use rust_decimal::{Decimal, RoundingStrategy};
use sqlx::PgPool;
use upline_common::config::Rules;

use crate::order::Order;

/// Expected commissions.
#[derive(Debug, Default)]
pub struct Expected {
    /// Level (1 = direct referrer) → total.
    pub by_level: HashMap<i16, Decimal>,
    /// Earner → total.
    pub by_earner: HashMap<i64, Decimal>,
    /// Earnings that should exist.
    pub count: usize,
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
                *expected.by_earner.entry(referrer).or_default() += amount;
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
    let actual: Vec<(i64, Decimal)> = sqlx::query_as(
        "select earner_id, sum(amount) from earnings where purchase_id like $1 group by 1",
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
    let broken: Vec<(i64, i64, i64)> = sqlx::query_as(
        r#"select u.id, u.earnings_seq, count(e.id) from users u left join earnings e on e.earner_id = u.id
           group by u.id having u.earnings_seq <> count(e.id) or u.total_earnings <> coalesce(sum(e.amount), 0)
           limit 10"#,
    )
    .fetch_all(db)
    .await?;
    for (id, seq, count) in broken {
        differences.push(format!(
            "user {id}: seq {seq} / total do not match its {count} earnings"
        ));
    }
    differences.truncate(10);
    Ok(differences)
}
