//! The transaction that records a batch of purchases and their earnings, exactly once.
//!
//! Exactly-once comes from the database: the purchase id is the primary key of `purchases`
//! (a second delivery finds it and changes nothing), the earners' rows are locked in id order
//! in one statement (so concurrent workers never deadlock and `seq`, totals and caps stay
//! exact), and every credited earning is written to `earning_outbox` in the same transaction,
//! to be published after the commit by the relay (see `outbox.rs`).
//!
//! A batch costs a fixed number of round trips whatever its size: every step is one set-based
//! statement over arrays (`unnest`).

use std::collections::{BTreeMap, HashMap};

use rust_decimal::Decimal;
use serde_json::{Map, Value};
use sqlx::{PgConnection, PgPool, Row};
use time::OffsetDateTime;
use upline_common::events::Totals;
use upline_common::money::Money;
use upline_common::purchase::{Purchase, PurchaseId};
use upline_common::rules::{self, Rules, UplineMember};
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

impl Incoming {
    fn purchase_id(&self) -> &PurchaseId {
        match self {
            Incoming::Valid(p) => &p.purchase_id,
            Incoming::Invalid { purchase_id, .. } => purchase_id,
        }
    }
}

/// One message to record: its content and its JSON body as received.
#[derive(Debug, Clone)]
pub struct Item {
    pub incoming: Incoming,
    pub body: Map<String, Value>,
}

impl Item {
    fn fingerprint(&self) -> String {
        match &self.incoming {
            Incoming::Valid(p) => p.fingerprint(),
            Incoming::Invalid { .. } => {
                upline_common::purchase::raw_fingerprint(&Value::Object(self.body.clone()))
            }
        }
    }
}

/// Records a batch in one transaction; returns one [`Recorded`] per item, in order. Items are
/// applied in order: an earner's `seq` follows the order of the batch.
///
/// # Errors
/// Database errors; the transaction is rolled back and nothing of the batch is recorded.
pub async fn record_batch(
    pool: &PgPool,
    rules: &Rules,
    items: &[Item],
) -> sqlx::Result<Vec<Recorded>> {
    let mut tx = pool.begin().await?;
    let results = record_in(&mut tx, rules, items).await?;
    tx.commit().await?;
    Ok(results)
}

/// A batch's state: per item, its result once known.
struct Batch<'a> {
    items: &'a [Item],
    fingerprints: Vec<String>,
    results: Vec<Option<Recorded>>,
}

async fn record_in(
    tx: &mut PgConnection,
    rules: &Rules,
    items: &[Item],
) -> sqlx::Result<Vec<Recorded>> {
    let mut batch = Batch {
        items,
        fingerprints: items.iter().map(Item::fingerprint).collect(),
        results: vec![None; items.len()],
    };
    let claimed = claim(tx, &mut batch).await?;
    credit(tx, rules, &mut batch, &claimed).await?;
    Ok(batch
        .results
        .into_iter()
        .map(|r| r.expect("every item gets a result"))
        .collect())
}

/// Inserts the batch's purchases, in purchase-id order (so two batches sharing ids wait on
/// each other in one order and never deadlock). Items whose id exists already, or repeats an
/// earlier item of the batch, become duplicates or conflicts. Returns the indexes of the
/// items this transaction claimed, in batch order.
async fn claim(tx: &mut PgConnection, batch: &mut Batch<'_>) -> sqlx::Result<Vec<usize>> {
    // The first item of each purchase id is a candidate; later ones compare with it.
    let mut seen: std::collections::HashSet<&str> = std::collections::HashSet::new();
    let is_candidate: Vec<bool> = batch
        .items
        .iter()
        .map(|item| seen.insert(item.incoming.purchase_id().as_str()))
        .collect();
    let candidates: Vec<usize> = (0..batch.items.len())
        .filter(|&i| is_candidate[i])
        .collect();
    let mut sorted = candidates.clone();
    sorted.sort_by(|&a, &b| {
        batch.items[a]
            .incoming
            .purchase_id()
            .as_str()
            .cmp(batch.items[b].incoming.purchase_id().as_str())
    });

    let mut ids = Vec::new();
    let mut statuses = Vec::new();
    let mut reasons: Vec<Option<String>> = Vec::new();
    let mut buyers: Vec<Option<i64>> = Vec::new();
    let mut amounts: Vec<Option<Decimal>> = Vec::new();
    let mut currencies: Vec<Option<String>> = Vec::new();
    let mut profits: Vec<Option<Decimal>> = Vec::new();
    let mut occurred: Vec<Option<OffsetDateTime>> = Vec::new();
    let mut fingerprints = Vec::new();
    let mut bodies = Vec::new();
    for &i in &sorted {
        let item = &batch.items[i];
        ids.push(item.incoming.purchase_id().as_str().to_owned());
        fingerprints.push(batch.fingerprints[i].clone());
        bodies.push(Value::Object(item.body.clone()).to_string());
        match &item.incoming {
            Incoming::Valid(p) => {
                statuses.push("processed");
                reasons.push(None);
                buyers.push(Some(p.buyer_id.get()));
                amounts.push(Some(p.amount.as_decimal()));
                currencies.push(Some(p.currency.clone()));
                profits.push(p.profit.map(Money::as_decimal));
                occurred.push(p.occurred_at);
            }
            Incoming::Invalid { reason, .. } => {
                statuses.push("rejected");
                reasons.push(Some(reason.clone()));
                buyers.push(None);
                amounts.push(None);
                currencies.push(None);
                profits.push(None);
                occurred.push(None);
            }
        }
    }
    let inserted: Vec<String> = sqlx::query_scalar(
        r#"insert into purchases (purchase_id, status, reason, buyer_id, amount, currency, profit, occurred_at, fingerprint, body)
           select id, status, reason, buyer, amount, currency, profit, coalesce(occurred, now()), fingerprint, body::jsonb
           from unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::numeric[], $6::text[], $7::numeric[],
                       $8::timestamptz[], $9::text[], $10::text[])
                as t(id, status, reason, buyer, amount, currency, profit, occurred, fingerprint, body)
           order by id
           on conflict (purchase_id) do nothing
           returning purchase_id"#,
    )
    .bind(&ids)
    .bind(&statuses)
    .bind(&reasons)
    .bind(&buyers)
    .bind(&amounts)
    .bind(&currencies)
    .bind(&profits)
    .bind(&occurred)
    .bind(&fingerprints)
    .bind(&bodies)
    .fetch_all(&mut *tx)
    .await?;
    let inserted: std::collections::HashSet<String> = inserted.into_iter().collect();

    // Everything not inserted now is compared with what is stored.
    let others: Vec<usize> = (0..batch.items.len())
        .filter(|&i| {
            !is_candidate[i] || !inserted.contains(batch.items[i].incoming.purchase_id().as_str())
        })
        .collect();
    if !others.is_empty() {
        let lookup: Vec<String> = others
            .iter()
            .map(|&i| batch.items[i].incoming.purchase_id().as_str().to_owned())
            .collect();
        let stored: HashMap<String, String> = sqlx::query_as::<_, (String, String)>(
            "select purchase_id, fingerprint from purchases where purchase_id = any($1)",
        )
        .bind(&lookup)
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .collect();
        let mut conflict_ids = Vec::new();
        let mut conflict_bodies = Vec::new();
        for &i in &others {
            let id = batch.items[i].incoming.purchase_id().as_str();
            let same = stored
                .get(id)
                .is_some_and(|fp| *fp == batch.fingerprints[i]);
            batch.results[i] = Some(if same {
                Recorded::Duplicate
            } else {
                Recorded::Conflict
            });
            if !same {
                conflict_ids.push(id.to_owned());
                conflict_bodies.push(Value::Object(batch.items[i].body.clone()).to_string());
            }
        }
        if !conflict_ids.is_empty() {
            sqlx::query(
                "insert into purchase_conflicts (purchase_id, body) select id, body::jsonb from unnest($1::text[], $2::text[]) as t(id, body)",
            )
            .bind(&conflict_ids)
            .bind(&conflict_bodies)
            .execute(&mut *tx)
            .await?;
        }
    }
    let claimed: Vec<usize> = candidates
        .into_iter()
        .filter(|&i| batch.results[i].is_none())
        .collect();
    for &i in &claimed {
        if let Incoming::Invalid { reason, .. } = &batch.items[i].incoming {
            batch.results[i] = Some(Recorded::Rejected {
                reason: reason.clone(),
            });
        }
    }
    Ok(claimed)
}

/// A locked earner: the row of `users` plus its per-level totals, updated in memory as the
/// batch is applied.
struct Earner {
    is_active: bool,
    seq: i64,
    total: Money,
    levels: Vec<Money>,
    changed: bool,
}

/// One earning row to insert.
struct NewEarning {
    earner_id: UserId,
    seq: i64,
    source_user_id: UserId,
    purchase_id: String,
    level: i16,
    rate: Decimal,
    amount: Decimal,
    currency: String,
    totals: String,
}

/// One row of `purchase_levels` to insert.
struct LevelOutcome {
    purchase_id: String,
    level: i16,
    earner_id: Option<UserId>,
    outcome: &'static str,
    rate: Decimal,
    amount: Decimal,
    /// Index into the batch's new earnings, when this level credited one.
    earning: Option<usize>,
}

/// Credits the uplines of the claimed valid purchases.
async fn credit(
    tx: &mut PgConnection,
    rules: &Rules,
    batch: &mut Batch<'_>,
    claimed: &[usize],
) -> sqlx::Result<()> {
    let purchases: Vec<(usize, &Purchase)> = claimed
        .iter()
        .filter_map(|&i| match &batch.items[i].incoming {
            Incoming::Valid(p) => Some((i, p)),
            Incoming::Invalid { .. } => None,
        })
        .collect();
    if purchases.is_empty() {
        return Ok(());
    }
    let levels = i32::try_from(rules.rates.len()).expect("at most 10 levels");
    let mut buyers: Vec<UserId> = purchases.iter().map(|(_, p)| p.buyer_id).collect();
    buyers.sort_unstable();
    buyers.dedup();
    // Each buyer (level 0) and up to `levels` ancestors. The referral graph is a forest.
    let rows = sqlx::query(
        r#"with recursive up (buyer, level, id, referrer_id) as (
               select u.id, 0, u.id, u.referrer_id from users u where u.id = any($1)
               union all
               select up.buyer, up.level + 1, u.id, u.referrer_id from users u join up on u.id = up.referrer_id
               where up.level < $2
           )
           select buyer, level, id from up"#,
    )
    .bind(&buyers)
    .bind(levels)
    .fetch_all(&mut *tx)
    .await?;
    let mut uplines: HashMap<UserId, BTreeMap<i32, UserId>> = HashMap::new();
    for row in rows {
        uplines
            .entry(row.get("buyer"))
            .or_default()
            .insert(row.get("level"), row.get("id"));
    }

    // Unknown buyers: the purchase is rejected.
    let mut rejected_ids = Vec::new();
    let mut rejected_reasons = Vec::new();
    for &(i, p) in &purchases {
        if !uplines.contains_key(&p.buyer_id) {
            let reason = format!("buyer_id: no user with id {}", p.buyer_id);
            rejected_ids.push(p.purchase_id.as_str().to_owned());
            rejected_reasons.push(reason.clone());
            batch.results[i] = Some(Recorded::Rejected { reason });
        }
    }
    if !rejected_ids.is_empty() {
        sqlx::query(
            r#"update purchases p set status = 'rejected', reason = t.reason
               from unnest($1::text[], $2::text[]) as t(id, reason) where p.purchase_id = t.id"#,
        )
        .bind(&rejected_ids)
        .bind(&rejected_reasons)
        .execute(&mut *tx)
        .await?;
    }

    // Lock every earner of the batch at once, in id order: the same order in every worker.
    // `for no key update` is enough (ids never change) and does not block readers' key locks.
    let mut earner_ids: Vec<UserId> = uplines
        .values()
        .flat_map(|u| u.iter().filter(|(l, _)| **l > 0).map(|(_, id)| *id))
        .collect();
    earner_ids.sort_unstable();
    earner_ids.dedup();
    let mut earners: HashMap<UserId, Earner> = HashMap::new();
    if !earner_ids.is_empty() {
        let rows = sqlx::query("select id, is_active, earnings_seq, total_earnings from users where id = any($1) order by id for no key update")
            .bind(&earner_ids)
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
                    changed: false,
                },
            );
        }
        let rows =
            sqlx::query("select user_id, level, total from earner_levels where user_id = any($1)")
                .bind(&earner_ids)
                .fetch_all(&mut *tx)
                .await?;
        for row in rows {
            let level: i16 = row.get("level");
            if let (Some(e), Ok(index)) = (
                earners.get_mut(&row.get::<UserId, _>("user_id")),
                usize::try_from(level - 1),
            ) {
                if let Some(slot) = e.levels.get_mut(index) {
                    *slot = Money::from_total(row.get("total"));
                }
            }
        }
    }

    // Apply the rules purchase by purchase, in batch order.
    let mut new_earnings: Vec<NewEarning> = Vec::new();
    let mut outcomes: Vec<LevelOutcome> = Vec::new();
    for &(i, p) in &purchases {
        let Some(upline) = uplines.get(&p.buyer_id) else {
            continue;
        };
        let members: Vec<UplineMember> = upline
            .iter()
            .filter(|(level, _)| **level > 0)
            .map(|(level, id)| {
                let e = earners.get(id);
                let index = usize::try_from(*level - 1).expect("levels above the buyer start at 1");
                UplineMember {
                    user_id: *id,
                    is_active: e.is_some_and(|e| e.is_active),
                    earned_at_level: e
                        .and_then(|e| e.levels.get(index).copied())
                        .unwrap_or(Money::ZERO),
                }
            })
            .collect();
        let shares = rules::shares(rules, p.amount, p.commission_base(), &members);
        let mut credited = 0;
        for share in &shares {
            let level = i16::from(share.level);
            let earning = match (
                share.outcome.credits(),
                share.earner_id.and_then(|id| earners.get_mut(&id)),
            ) {
                (true, Some(earner)) => {
                    earner.seq += 1;
                    earner.total += share.amount;
                    earner.levels[share.level.index()] += share.amount;
                    earner.changed = true;
                    let totals = Totals {
                        total: earner.total,
                        levels: earner.levels.clone(),
                    };
                    new_earnings.push(NewEarning {
                        earner_id: share.earner_id.expect("a crediting share names its earner"),
                        seq: earner.seq,
                        source_user_id: p.buyer_id,
                        purchase_id: p.purchase_id.as_str().to_owned(),
                        level,
                        rate: share.rate,
                        amount: share.amount.as_decimal(),
                        currency: p.currency.clone(),
                        totals: serde_json::to_string(&totals).expect("totals serialise"),
                    });
                    credited += 1;
                    Some(new_earnings.len() - 1)
                }
                _ => None,
            };
            outcomes.push(LevelOutcome {
                purchase_id: p.purchase_id.as_str().to_owned(),
                level,
                earner_id: share.earner_id,
                outcome: share.outcome.as_str(),
                rate: share.rate,
                amount: share.amount.as_decimal(),
                earning,
            });
        }
        batch.results[i] = Some(Recorded::Processed { earnings: credited });
    }

    let earning_ids = insert_earnings(tx, &new_earnings).await?;
    update_aggregates(tx, &new_earnings, &earners).await?;

    let (
        mut l_ids,
        mut l_levels,
        mut l_earners,
        mut l_outcomes,
        mut l_rates,
        mut l_amounts,
        mut l_earnings,
    ) = (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
    for o in outcomes {
        l_ids.push(o.purchase_id);
        l_levels.push(o.level);
        l_earners.push(o.earner_id);
        l_outcomes.push(o.outcome);
        l_rates.push(o.rate);
        l_amounts.push(o.amount);
        l_earnings.push(o.earning.map(|e| earning_ids[e]));
    }
    sqlx::query(
        r#"insert into purchase_levels (purchase_id, level, earner_id, outcome, rate, amount, earning_id)
           select * from unnest($1::text[], $2::int2[], $3::int8[], $4::text[], $5::numeric[], $6::numeric[], $7::int8[])"#,
    )
    .bind(&l_ids)
    .bind(&l_levels)
    .bind(&l_earners)
    .bind(&l_outcomes)
    .bind(&l_rates)
    .bind(&l_amounts)
    .bind(&l_earnings)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Inserts the earnings and queues them in the outbox; returns their ids, in order.
async fn insert_earnings(tx: &mut PgConnection, earnings: &[NewEarning]) -> sqlx::Result<Vec<i64>> {
    if earnings.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<(i32, i64)> = sqlx::query_as(
        r#"with new as (
               insert into earnings (earner_id, seq, source_user_id, purchase_id, level, rate, amount, currency, totals)
               select earner, seq, source, purchase, level, rate, amount, currency, totals::jsonb
               from unnest($1::int8[], $2::int8[], $3::int8[], $4::text[], $5::int2[], $6::numeric[], $7::numeric[],
                           $8::text[], $9::text[])
                    with ordinality as t(earner, seq, source, purchase, level, rate, amount, currency, totals, n)
               order by n
               returning id, earner_id, seq
           ), queued as (
               insert into earning_outbox (earning_id) select id from new
           )
           select t.n::int4, new.id
           from new join unnest($1::int8[], $2::int8[]) with ordinality as t(earner, seq, n)
             on new.earner_id = t.earner and new.seq = t.seq"#,
    )
    .bind(earnings.iter().map(|e| e.earner_id).collect::<Vec<_>>())
    .bind(earnings.iter().map(|e| e.seq).collect::<Vec<_>>())
    .bind(earnings.iter().map(|e| e.source_user_id).collect::<Vec<_>>())
    .bind(earnings.iter().map(|e| e.purchase_id.clone()).collect::<Vec<_>>())
    .bind(earnings.iter().map(|e| e.level).collect::<Vec<_>>())
    .bind(earnings.iter().map(|e| e.rate).collect::<Vec<_>>())
    .bind(earnings.iter().map(|e| e.amount).collect::<Vec<_>>())
    .bind(earnings.iter().map(|e| e.currency.clone()).collect::<Vec<_>>())
    .bind(earnings.iter().map(|e| e.totals.clone()).collect::<Vec<_>>())
    .fetch_all(&mut *tx)
    .await?;
    let mut by_position = vec![0i64; earnings.len()];
    for (n, id) in ids {
        by_position[usize::try_from(n - 1).expect("ordinality starts at 1")] = id;
    }
    Ok(by_position)
}

/// Updates `users` (seq, total), `earner_levels` and `earner_referrals` for what the batch
/// credited: one statement each, with the batch's sums per row.
async fn update_aggregates(
    tx: &mut PgConnection,
    earnings: &[NewEarning],
    earners: &HashMap<UserId, Earner>,
) -> sqlx::Result<()> {
    if earnings.is_empty() {
        return Ok(());
    }
    let changed: Vec<(&UserId, &Earner)> = earners.iter().filter(|(_, e)| e.changed).collect();
    sqlx::query(
        r#"update users u set earnings_seq = t.seq, total_earnings = t.total
           from unnest($1::int8[], $2::int8[], $3::numeric[]) as t(id, seq, total) where u.id = t.id"#,
    )
    .bind(changed.iter().map(|(id, _)| **id).collect::<Vec<_>>())
    .bind(changed.iter().map(|(_, e)| e.seq).collect::<Vec<_>>())
    .bind(changed.iter().map(|(_, e)| e.total.as_decimal()).collect::<Vec<_>>())
    .execute(&mut *tx)
    .await?;

    let mut per_level: BTreeMap<(UserId, i16), (Decimal, i64)> = BTreeMap::new();
    let mut per_referral: BTreeMap<(UserId, UserId, i16), (Decimal, i64)> = BTreeMap::new();
    for e in earnings {
        let l = per_level.entry((e.earner_id, e.level)).or_default();
        l.0 += e.amount;
        l.1 += 1;
        let r = per_referral
            .entry((e.earner_id, e.source_user_id, e.level))
            .or_default();
        r.0 += e.amount;
        r.1 += 1;
    }
    sqlx::query(
        r#"insert into earner_levels (user_id, level, total, count)
           select * from unnest($1::int8[], $2::int2[], $3::numeric[], $4::int8[])
           on conflict (user_id, level)
           do update set total = earner_levels.total + excluded.total, count = earner_levels.count + excluded.count"#,
    )
    .bind(per_level.keys().map(|k| k.0).collect::<Vec<_>>())
    .bind(per_level.keys().map(|k| k.1).collect::<Vec<_>>())
    .bind(per_level.values().map(|v| v.0).collect::<Vec<_>>())
    .bind(per_level.values().map(|v| v.1).collect::<Vec<_>>())
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        r#"insert into earner_referrals (user_id, source_user_id, level, total, count)
           select * from unnest($1::int8[], $2::int8[], $3::int2[], $4::numeric[], $5::int8[])
           on conflict (user_id, source_user_id, level)
           do update set total = earner_referrals.total + excluded.total, count = earner_referrals.count + excluded.count"#,
    )
    .bind(per_referral.keys().map(|k| k.0).collect::<Vec<_>>())
    .bind(per_referral.keys().map(|k| k.1).collect::<Vec<_>>())
    .bind(per_referral.keys().map(|k| k.2).collect::<Vec<_>>())
    .bind(per_referral.values().map(|v| v.0).collect::<Vec<_>>())
    .bind(per_referral.values().map(|v| v.1).collect::<Vec<_>>())
    .execute(&mut *tx)
    .await?;
    Ok(())
}
