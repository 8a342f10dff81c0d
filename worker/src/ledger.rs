//! The transaction that records a purchase and its earnings, exactly once.
//!
//! Exactly-once comes from the database: the purchase id is the primary key of `purchases`
//! (a second delivery finds it and changes nothing), the earners' rows are locked in id order
//! (so concurrent workers never deadlock and `seq`, totals and caps stay exact), and every
//! credited earning is written to `earning_outbox` in the same transaction, to be published
//! after the commit by the relay (see `outbox.rs`).

use std::collections::HashMap;

use serde_json::{Map, Value};
use sqlx::{PgConnection, PgPool, Row};
use upline_common::events::Totals;
use upline_common::money::Money;
use upline_common::purchase::{Purchase, PurchaseId};
use upline_common::rules::{self, LevelShare, Rules, UplineMember};
use upline_common::UserId;

/// What recording a purchase came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recorded {
    /// Newly processed; `earnings` commissions were credited.
    Processed { earnings: usize },
    /// Newly stored as rejected, with this reason.
    Rejected { reason: String },
    /// Already recorded with the same content: nothing changed.
    Duplicate,
    /// Already recorded with different content: the conflict is logged, nothing is paid.
    Conflict,
}

/// Content to record under a purchase id.
#[derive(Debug, Clone)]
pub enum Incoming {
    Valid(Purchase),
    /// Bad content under a usable id (SPEC §3): stored as `rejected` with `reason`.
    Invalid {
        purchase_id: PurchaseId,
        reason: String,
    },
}

/// Records `incoming` (whose JSON body is `body`) in one transaction.
///
/// # Errors
/// Database errors; the transaction is rolled back and nothing is recorded.
pub async fn record(
    pool: &PgPool,
    rules: &Rules,
    incoming: &Incoming,
    body: &Map<String, Value>,
) -> sqlx::Result<Recorded> {
    let mut tx = pool.begin().await?;
    let recorded = match incoming {
        Incoming::Invalid {
            purchase_id,
            reason,
        } => {
            let fingerprint =
                upline_common::purchase::raw_fingerprint(&Value::Object(body.clone()));
            match claim(&mut tx, purchase_id, &fingerprint, body, None, Some(reason)).await? {
                Some(existing) => existing,
                None => Recorded::Rejected {
                    reason: reason.clone(),
                },
            }
        }
        Incoming::Valid(purchase) => {
            match claim(
                &mut tx,
                &purchase.purchase_id,
                &purchase.fingerprint(),
                body,
                Some(purchase),
                None,
            )
            .await?
            {
                Some(existing) => existing,
                None => credit(&mut tx, rules, purchase).await?,
            }
        }
    };
    tx.commit().await?;
    Ok(recorded)
}

/// Inserts the purchase row, or tells how it relates to the one already there.
/// `None` = newly claimed by this transaction.
async fn claim(
    tx: &mut PgConnection,
    purchase_id: &PurchaseId,
    fingerprint: &str,
    body: &Map<String, Value>,
    purchase: Option<&Purchase>,
    reason: Option<&String>,
) -> sqlx::Result<Option<Recorded>> {
    let inserted = sqlx::query(
        r#"insert into purchases (purchase_id, status, reason, buyer_id, amount, currency, profit, occurred_at, fingerprint, body)
           values ($1, $2, $3, $4, $5, $6, $7, coalesce($8, now()), $9, $10)
           on conflict (purchase_id) do nothing"#,
    )
    .bind(purchase_id.as_str())
    .bind(if purchase.is_some() { "processed" } else { "rejected" })
    .bind(reason)
    .bind(purchase.map(|p| p.buyer_id))
    .bind(purchase.map(|p| p.amount.as_decimal()))
    .bind(purchase.map(|p| p.currency.as_str()))
    .bind(purchase.and_then(|p| p.profit).map(Money::as_decimal))
    .bind(purchase.and_then(|p| p.occurred_at))
    .bind(fingerprint)
    .bind(sqlx::types::Json(body))
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if inserted == 1 {
        return Ok(None);
    }
    let existing: String =
        sqlx::query_scalar("select fingerprint from purchases where purchase_id = $1")
            .bind(purchase_id.as_str())
            .fetch_one(&mut *tx)
            .await?;
    if existing == fingerprint {
        return Ok(Some(Recorded::Duplicate));
    }
    sqlx::query("insert into purchase_conflicts (purchase_id, body) values ($1, $2)")
        .bind(purchase_id.as_str())
        .bind(sqlx::types::Json(body))
        .execute(&mut *tx)
        .await?;
    Ok(Some(Recorded::Conflict))
}

/// A locked earner: the row of `users` plus its per-level totals.
struct Earner {
    is_active: bool,
    seq: i64,
    total: Money,
    levels: Vec<Money>,
}

/// Credits the upline of a newly claimed valid purchase.
async fn credit(
    tx: &mut PgConnection,
    rules: &Rules,
    purchase: &Purchase,
) -> sqlx::Result<Recorded> {
    let levels = i32::try_from(rules.rates.len()).expect("at most 10 levels");
    // The buyer (level 0) and up to `levels` ancestors. The referral graph is a forest.
    let chain: Vec<(i32, UserId)> = sqlx::query_as(
        r#"with recursive up (level, id, referrer_id) as (
               select 0, id, referrer_id from users where id = $1
               union all
               select up.level + 1, u.id, u.referrer_id from users u join up on u.id = up.referrer_id
               where up.level < $2
           )
           select level, id from up order by level"#,
    )
    .bind(purchase.buyer_id)
    .bind(levels)
    .fetch_all(&mut *tx)
    .await?;
    if chain.is_empty() {
        let reason = format!("buyer_id: no user with id {}", purchase.buyer_id);
        sqlx::query("update purchases set status = 'rejected', reason = $2 where purchase_id = $1")
            .bind(purchase.purchase_id.as_str())
            .bind(&reason)
            .execute(&mut *tx)
            .await?;
        return Ok(Recorded::Rejected { reason });
    }
    let upline_ids: Vec<UserId> = chain
        .iter()
        .filter(|(level, _)| *level > 0)
        .map(|&(_, id)| id)
        .collect();

    // Lock the earners in id order: every worker takes row locks in the same order.
    let mut earners: HashMap<UserId, Earner> = HashMap::new();
    if !upline_ids.is_empty() {
        let rows = sqlx::query(
            "select id, is_active, earnings_seq, total_earnings from users where id = any($1) order by id for update",
        )
        .bind(&upline_ids)
        .fetch_all(&mut *tx)
        .await?;
        for row in rows {
            earners.insert(
                row.get("id"),
                Earner {
                    is_active: row.get("is_active"),
                    seq: row.get("earnings_seq"),
                    total: Money::from_total(row.get("total_earnings")),
                    levels: vec![Money::ZERO; rules.rates.len()],
                },
            );
        }
        let level_rows =
            sqlx::query("select user_id, level, total from earner_levels where user_id = any($1)")
                .bind(&upline_ids)
                .fetch_all(&mut *tx)
                .await?;
        for row in level_rows {
            let level: i16 = row.get("level");
            if let Some(e) = earners.get_mut(&row.get::<i64, _>("user_id")) {
                let index = usize::try_from(level - 1).unwrap_or(usize::MAX);
                if let Some(slot) = e.levels.get_mut(index) {
                    *slot = Money::from_total(row.get("total"));
                }
            }
        }
    }

    let upline: Vec<UplineMember> = upline_ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let e = earners.get(id);
            UplineMember {
                user_id: *id,
                is_active: e.is_some_and(|e| e.is_active),
                earned_at_level: e
                    .and_then(|e| e.levels.get(i).copied())
                    .unwrap_or(Money::ZERO),
            }
        })
        .collect();
    let shares = rules::shares(rules, purchase.amount, purchase.commission_base(), &upline);

    let mut credited = 0;
    for share in &shares {
        let earning_id = match (
            share.outcome.credits(),
            share.earner_id.and_then(|id| earners.get_mut(&id)),
        ) {
            (true, Some(earner)) => Some(insert_earning(tx, purchase, share, earner).await?),
            _ => None,
        };
        credited += usize::from(earning_id.is_some());
        sqlx::query(
            r#"insert into purchase_levels (purchase_id, level, earner_id, outcome, rate, amount, earning_id)
               values ($1, $2, $3, $4, $5, $6, $7)"#,
        )
        .bind(purchase.purchase_id.as_str())
        .bind(i16::from(share.level))
        .bind(share.earner_id)
        .bind(share.outcome.as_str())
        .bind(share.rate)
        .bind(share.amount.as_decimal())
        .bind(earning_id)
        .execute(&mut *tx)
        .await?;
    }
    Ok(Recorded::Processed { earnings: credited })
}

/// Writes one earning with the earner's next `seq` and running totals, updates the
/// aggregates, and queues the event in the outbox. Returns the earning id.
async fn insert_earning(
    tx: &mut PgConnection,
    purchase: &Purchase,
    share: &LevelShare,
    earner: &mut Earner,
) -> sqlx::Result<i64> {
    let earner_id = share.earner_id.expect("a crediting share names its earner");
    let level = i16::from(share.level);
    earner.seq += 1;
    earner.total += share.amount;
    let index = usize::from(share.level - 1);
    earner.levels[index] += share.amount;
    let totals = Totals {
        total: earner.total,
        levels: earner.levels.clone(),
    };

    let earning_id: i64 = sqlx::query_scalar(
        r#"insert into earnings (earner_id, seq, source_user_id, purchase_id, level, rate, amount, currency, totals)
           values ($1, $2, $3, $4, $5, $6, $7, $8, $9) returning id"#,
    )
    .bind(earner_id)
    .bind(earner.seq)
    .bind(purchase.buyer_id)
    .bind(purchase.purchase_id.as_str())
    .bind(level)
    .bind(share.rate)
    .bind(share.amount.as_decimal())
    .bind(&purchase.currency)
    .bind(sqlx::types::Json(&totals))
    .fetch_one(&mut *tx)
    .await?;
    sqlx::query(
        "update users set earnings_seq = $2, total_earnings = total_earnings + $3 where id = $1",
    )
    .bind(earner_id)
    .bind(earner.seq)
    .bind(share.amount.as_decimal())
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        r#"insert into earner_levels (user_id, level, total, count) values ($1, $2, $3, 1)
           on conflict (user_id, level) do update set total = earner_levels.total + excluded.total, count = earner_levels.count + 1"#,
    )
    .bind(earner_id)
    .bind(level)
    .bind(share.amount.as_decimal())
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        r#"insert into earner_referrals (user_id, source_user_id, level, total, count) values ($1, $2, $3, $4, 1)
           on conflict (user_id, source_user_id, level)
           do update set total = earner_referrals.total + excluded.total, count = earner_referrals.count + 1"#,
    )
    .bind(earner_id)
    .bind(purchase.buyer_id)
    .bind(level)
    .bind(share.amount.as_decimal())
    .execute(&mut *tx)
    .await?;
    sqlx::query("insert into earning_outbox (earning_id) values ($1)")
        .bind(earning_id)
        .execute(&mut *tx)
        .await?;
    Ok(earning_id)
}
