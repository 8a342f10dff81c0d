//! The commission lifecycle in the ledger (docs/contract.md §10): refunds and the reversals
//! they cause, refunds parked until their purchase arrives, and the approval of commissions
//! whose holding period ended.
//!
//! The ledger stays append-only: a reversal or an approval is a new `earnings` row with the
//! earner's next `seq`, queued in `earning_outbox` in the same transaction as everything else
//! it changes. Locks are taken in the batch's order (a purchase row, then the earners in id
//! order), so refunds, approvals and purchase batches never deadlock one another:
//! - a refund locks its `refunds` row, then its purchase row (so refunds of one purchase
//!   apply one at a time, across any number of workers), then the commissions' earners;
//! - the approval job claims `commission_holds` rows with `for update skip locked` (each held
//!   commission is claimed by exactly one worker), then locks their earners. It never touches
//!   a purchase row, and a refund never touches `commission_holds`.
//!
//! Whether a commission is still held is read only after its earner is locked: an approval
//! and a reversal of the same commission are serialised by that lock, whichever comes first.

use std::collections::HashMap;

use rust_decimal::Decimal;
use sqlx::{PgConnection, PgPool};
use upline_common::events::Totals;
use upline_common::money::Money;
use upline_common::refund;
use upline_common::rules::{self, CommissionStatus, EntryKind, Movement, RefundRejection, Rules};
use upline_common::{Level, UserId};

use super::lock_earners;
use super::plan::Earner;

/// Most held commissions one approval transaction claims.
pub const APPROVAL_BATCH: i64 = 500;
/// Most parked refunds one sweep applies.
const WAITING_BATCH: i64 = 500;

/// What recording a refund came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefundRecorded {
    /// Applied: `reversals` commissions were clawed back (in part or in full).
    Applied { reversals: usize },
    /// Its purchase is not recorded yet: parked, and applied when the purchase arrives.
    Waiting,
    /// Stored as rejected with this reason (bad amount, more than what remains, a rejected
    /// purchase).
    Rejected { reason: String },
    /// Already recorded with the same content: nothing changed.
    Duplicate,
    /// Already recorded with different content: nothing changed.
    Conflict,
}

/// Records a refund message: stores it under its `refund_id` (the idempotency key) and
/// applies it at once when its purchase is recorded.
///
/// # Errors
/// Database errors; nothing is recorded.
pub async fn record_refund(
    db: &PgPool,
    rules: &Rules,
    incoming: &refund::Incoming,
) -> sqlx::Result<RefundRecorded> {
    let (refund_id, purchase_id, requested, rejection, fingerprint) = match incoming {
        refund::Incoming::Valid(r) => (
            r.refund_id.as_str(),
            r.purchase_id.as_str(),
            r.amount.map(Money::as_decimal),
            None,
            r.fingerprint(),
        ),
        refund::Incoming::Invalid {
            refund_id,
            purchase_id,
            reason,
            fingerprint,
        } => (
            refund_id.as_str(),
            purchase_id.as_str(),
            None,
            Some(reason.clone()),
            fingerprint.clone(),
        ),
    };
    let mut tx = db.begin().await?;
    let inserted = sqlx::query_scalar!(
        r#"insert into refunds (refund_id, purchase_id, requested, status, reason, fingerprint)
           values ($1, $2, $3, case when $4::text is null then 'waiting' else 'rejected' end, $4, $5)
           on conflict (refund_id) do nothing
           returning refund_id"#,
        refund_id,
        purchase_id,
        requested,
        rejection.as_deref(),
        fingerprint,
    )
    .fetch_optional(&mut *tx)
    .await?;
    let recorded = if inserted.is_none() {
        let stored = sqlx::query_scalar!(
            "select fingerprint from refunds where refund_id = $1",
            refund_id
        )
        .fetch_one(&mut *tx)
        .await?;
        if stored == fingerprint {
            RefundRecorded::Duplicate
        } else {
            RefundRecorded::Conflict
        }
    } else if let Some(reason) = rejection {
        RefundRecorded::Rejected { reason }
    } else {
        apply(&mut tx, rules, refund_id).await?
    };
    tx.commit().await?;
    Ok(recorded)
}

/// Applies the parked refunds whose purchase is recorded now: those of `purchase_ids`, or
/// (with `None`, the schedule's sweep) any. Each in a transaction of its own. Returns how
/// many were applied or rejected.
///
/// # Errors
/// Database errors; refunds applied before the error stay applied.
pub async fn apply_waiting(
    db: &PgPool,
    rules: &Rules,
    purchase_ids: Option<&[String]>,
) -> sqlx::Result<usize> {
    let waiting = sqlx::query_scalar!(
        r#"select r.refund_id from refunds r
           where r.status = 'waiting'
             and ($1::text[] is null or r.purchase_id = any($1))
             and exists (select 1 from purchases p where p.purchase_id = r.purchase_id)
           order by r.received_at, r.refund_id
           limit $2"#,
        purchase_ids as Option<&[String]>,
        WAITING_BATCH,
    )
    .fetch_all(db)
    .await?;
    let mut done = 0;
    for refund_id in waiting {
        let mut tx = db.begin().await?;
        let recorded = apply(&mut tx, rules, &refund_id).await?;
        tx.commit().await?;
        if recorded != RefundRecorded::Waiting && recorded != RefundRecorded::Duplicate {
            count(&recorded);
            done += 1;
        }
    }
    Ok(done)
}

/// Counts a refund's result in `upline_refunds_total{result}`.
pub fn count(recorded: &RefundRecorded) {
    let result = match recorded {
        RefundRecorded::Applied { .. } => "applied",
        RefundRecorded::Waiting => "waiting",
        RefundRecorded::Rejected { .. } => "rejected",
        RefundRecorded::Duplicate => "duplicate",
        RefundRecorded::Conflict => "conflict",
    };
    metrics::counter!("upline_refunds_total", "result" => result).increment(1);
}

/// Applies a stored, waiting refund: under its purchase row's lock, decides how much it
/// refunds ([`rules::refundable`]), claws back each commission's share ([`rules::reversal`])
/// as reversal entries, and marks it applied (or rejected, with the reason).
async fn apply(
    tx: &mut PgConnection,
    rules: &Rules,
    refund_id: &str,
) -> sqlx::Result<RefundRecorded> {
    let refund = sqlx::query!(
        "select purchase_id, requested, status from refunds where refund_id = $1 for update",
        refund_id,
    )
    .fetch_one(&mut *tx)
    .await?;
    if refund.status != "waiting" {
        return Ok(RefundRecorded::Duplicate);
    }
    let Some(purchase) = sqlx::query!(
        "select status, amount, refunded from purchases where purchase_id = $1 for update",
        refund.purchase_id,
    )
    .fetch_optional(&mut *tx)
    .await?
    else {
        return Ok(RefundRecorded::Waiting);
    };
    let Some(purchase_amount) = purchase
        .amount
        .filter(|_| purchase.status == "processed")
        .map(Money::from_total)
    else {
        let reason = "purchase_id: the purchase was rejected; there is nothing to refund";
        return reject(tx, refund_id, reason.into()).await;
    };
    let refunded_before = Money::from_total(purchase.refunded);
    let requested = refund.requested.map(Money::from_total);
    let amount = match rules::refundable(requested, purchase_amount, refunded_before) {
        Ok(amount) => amount,
        Err(rejection @ (RefundRejection::Exceeds { .. } | RefundRejection::NothingLeft)) => {
            return reject(tx, refund_id, rejection.to_string()).await;
        }
    };
    let refunded_after = refunded_before + amount;

    let earner_ids = sqlx::query_scalar!(
        r#"select earner_id as "earner_id: UserId" from earnings
           where kind = 'commission' and purchase_id = $1"#,
        refund.purchase_id,
    )
    .fetch_all(&mut *tx)
    .await?;
    let mut earners = lock_earners(tx, earner_ids, rules.rates.len()).await?;
    // Read after the earners' locks: whether each is still held, and what is reversed already.
    let commissions = sqlx::query!(
        r#"select e.id, e.earner_id as "earner_id: UserId", e.source_user_id as "source_user_id!: UserId",
                  e.level as "level!: Level", e.rate as "rate!", e.amount, e.currency,
                  (e.hold_until is null or exists (select 1 from earnings a
                                                   where a.kind = 'approval' and a.refers_to = e.id)) as "approved!",
                  coalesce((select -sum(r.amount) from earnings r
                            where r.kind = 'reversal' and r.refers_to = e.id), 0) as "reversed!"
           from earnings e
           where e.kind = 'commission' and e.purchase_id = $1
           order by e.level"#,
        refund.purchase_id,
    )
    .fetch_all(&mut *tx)
    .await?;
    let mut entries = Vec::new();
    for c in commissions {
        let due = rules::reversal(
            Money::from_total(c.amount),
            purchase_amount,
            refunded_after,
            Money::from_total(c.reversed),
        );
        if due.is_zero() {
            continue;
        }
        let Some(earner) = earners.get_mut(&c.earner_id) else {
            continue;
        };
        let status = if c.approved {
            CommissionStatus::Approved
        } else {
            CommissionStatus::Pending
        };
        earner.seq += 1;
        earner.total -= due;
        earner.levels[c.level.index()] -= due;
        earner.balances.apply(Movement::Reverse(status), due);
        earner.changed = true;
        entries.push(Entry {
            earner_id: c.earner_id,
            seq: earner.seq,
            kind: EntryKind::Reversal,
            source_user_id: Some(c.source_user_id),
            purchase_id: Some(refund.purchase_id.clone()),
            level: Some(c.level),
            rate: Some(c.rate),
            amount: -due,
            currency: c.currency,
            refers_to: Some(c.id),
            refund_id: Some(refund_id.to_owned()),
            totals: totals(earner),
        });
    }
    insert_entries(tx, &entries).await?;
    write_earners(tx, &earners).await?;
    // Aggregates are net of reversals: the cap (earner_levels) gets the room back, and the
    // by-referral and by-leg reports show what the referral brought in after refunds.
    sqlx::query!(
        r#"update earner_levels l set total = l.total + t.delta
           from unnest($1::int8[], $2::int2[], $3::numeric[]) as t(id, level, delta)
           where l.user_id = t.id and l.level = t.level"#,
        &entries
            .iter()
            .map(|e| e.earner_id.get())
            .collect::<Vec<_>>(),
        &entries.iter().map(level_of).collect::<Vec<_>>(),
        &entries
            .iter()
            .map(|e| e.amount.as_decimal())
            .collect::<Vec<_>>(),
    )
    .execute(&mut *tx)
    .await?;
    sqlx::query!(
        r#"update earner_referrals r set total = r.total + t.delta
           from unnest($1::int8[], $2::int8[], $3::int2[], $4::numeric[]) as t(id, source, level, delta)
           where r.user_id = t.id and r.source_user_id = t.source and r.level = t.level"#,
        &entries.iter().map(|e| e.earner_id.get()).collect::<Vec<_>>(),
        &entries
            .iter()
            .map(|e| e.source_user_id.map_or(0, UserId::get))
            .collect::<Vec<_>>(),
        &entries.iter().map(level_of).collect::<Vec<_>>(),
        &entries
            .iter()
            .map(|e| e.amount.as_decimal())
            .collect::<Vec<_>>(),
    )
    .execute(&mut *tx)
    .await?;
    sqlx::query!(
        "update purchases set refunded = $2 where purchase_id = $1",
        refund.purchase_id,
        refunded_after.as_decimal(),
    )
    .execute(&mut *tx)
    .await?;
    sqlx::query!(
        "update refunds set status = 'applied', amount = $2, applied_at = now() where refund_id = $1",
        refund_id,
        amount.as_decimal(),
    )
    .execute(&mut *tx)
    .await?;
    Ok(RefundRecorded::Applied {
        reversals: entries.len(),
    })
}

async fn reject(
    tx: &mut PgConnection,
    refund_id: &str,
    reason: String,
) -> sqlx::Result<RefundRecorded> {
    sqlx::query!(
        "update refunds set status = 'rejected', reason = $2, applied_at = now() where refund_id = $1",
        refund_id,
        reason,
    )
    .execute(&mut *tx)
    .await?;
    Ok(RefundRecorded::Rejected { reason })
}

/// Approves up to [`APPROVAL_BATCH`] commissions whose holding period ended, in one
/// transaction; returns how many were claimed and how many of those were approved (the others
/// were voided by refunds, or approved already). Any number of workers may run it at once: each held commission is claimed by
/// exactly one of them (`for update skip locked`), and a unique index allows one approval
/// per commission whatever happens.
///
/// # Errors
/// Database errors; nothing is approved and the claims are released.
pub async fn approve_due(db: &PgPool, rules: &Rules) -> sqlx::Result<(usize, usize)> {
    let mut tx = db.begin().await?;
    let claimed = sqlx::query_scalar!(
        r#"delete from commission_holds
           where earning_id = any(array(select earning_id from commission_holds
                                        where due_at <= now()
                                        order by due_at
                                        limit $1
                                        for update skip locked))
           returning earning_id"#,
        APPROVAL_BATCH,
    )
    .fetch_all(&mut *tx)
    .await?;
    if claimed.is_empty() {
        tx.commit().await?;
        return Ok((0, 0));
    }
    let earner_ids = sqlx::query_scalar!(
        r#"select distinct earner_id as "earner_id: UserId" from earnings where id = any($1)"#,
        &claimed,
    )
    .fetch_all(&mut *tx)
    .await?;
    let mut earners = lock_earners(&mut tx, earner_ids, rules.rates.len()).await?;
    let commissions = sqlx::query!(
        r#"select e.id, e.earner_id as "earner_id: UserId", e.source_user_id as "source_user_id!: UserId",
                  e.purchase_id as "purchase_id!", e.level as "level!: Level", e.rate as "rate!",
                  e.amount, e.currency,
                  exists (select 1 from earnings a where a.kind = 'approval' and a.refers_to = e.id) as "approved!",
                  coalesce((select -sum(r.amount) from earnings r
                            where r.kind = 'reversal' and r.refers_to = e.id), 0) as "reversed!"
           from earnings e
           where e.id = any($1) and e.kind = 'commission'
           order by e.id"#,
        &claimed,
    )
    .fetch_all(&mut *tx)
    .await?;
    let mut entries = Vec::new();
    for c in commissions {
        let remaining = Money::from_total(c.amount) - Money::from_total(c.reversed);
        if c.approved || remaining.is_zero() || remaining.is_negative() {
            // Approved already (never twice), or voided by refunds: nothing moves.
            continue;
        }
        let Some(earner) = earners.get_mut(&c.earner_id) else {
            continue;
        };
        earner.seq += 1;
        earner.balances.apply(Movement::Approve, remaining);
        earner.changed = true;
        entries.push(Entry {
            earner_id: c.earner_id,
            seq: earner.seq,
            kind: EntryKind::Approval,
            source_user_id: Some(c.source_user_id),
            purchase_id: Some(c.purchase_id),
            level: Some(c.level),
            rate: Some(c.rate),
            amount: remaining,
            currency: c.currency,
            refers_to: Some(c.id),
            refund_id: None,
            totals: totals(earner),
        });
    }
    insert_entries(&mut tx, &entries).await?;
    write_earners(&mut tx, &earners).await?;
    tx.commit().await?;
    Ok((claimed.len(), entries.len()))
}

/// One ledger entry to append (a reversal or an approval).
struct Entry {
    earner_id: UserId,
    seq: i64,
    kind: EntryKind,
    source_user_id: Option<UserId>,
    purchase_id: Option<String>,
    level: Option<Level>,
    rate: Option<Decimal>,
    /// Signed: negative for a reversal.
    amount: Money,
    currency: String,
    refers_to: Option<i64>,
    refund_id: Option<String>,
    totals: Totals,
}

fn level_of(e: &Entry) -> i16 {
    e.level.map_or(0, i16::from)
}

fn totals(earner: &Earner) -> Totals {
    Totals {
        total: earner.total,
        levels: earner.levels.clone(),
        balances: earner.balances,
    }
}

/// Appends the entries and queues them in the outbox, in one statement.
async fn insert_entries(tx: &mut PgConnection, entries: &[Entry]) -> sqlx::Result<()> {
    if entries.is_empty() {
        return Ok(());
    }
    let sources: Vec<Option<i64>> = entries
        .iter()
        .map(|e| e.source_user_id.map(UserId::get))
        .collect();
    let purchases: Vec<Option<String>> = entries.iter().map(|e| e.purchase_id.clone()).collect();
    let levels: Vec<Option<i16>> = entries.iter().map(|e| e.level.map(i16::from)).collect();
    let rates: Vec<Option<Decimal>> = entries.iter().map(|e| e.rate).collect();
    let refers: Vec<Option<i64>> = entries.iter().map(|e| e.refers_to).collect();
    let refunds: Vec<Option<String>> = entries.iter().map(|e| e.refund_id.clone()).collect();
    sqlx::query!(
        r#"with new as (
               insert into earnings (earner_id, seq, kind, source_user_id, purchase_id, level, rate, amount,
                                     currency, refers_to, refund_id, totals)
               select earner, seq, kind, source, purchase, level, rate, amount, currency, refers, refund, totals::jsonb
               from unnest($1::int8[], $2::int8[], $3::text[], $4::int8[], $5::text[], $6::int2[], $7::numeric[],
                           $8::numeric[], $9::text[], $10::int8[], $11::text[], $12::text[])
                    with ordinality as t(earner, seq, kind, source, purchase, level, rate, amount, currency, refers,
                                         refund, totals, n)
               order by n
               returning id
           )
           insert into earning_outbox (earning_id) select id from new"#,
        &entries.iter().map(|e| e.earner_id.get()).collect::<Vec<_>>(),
        &entries.iter().map(|e| e.seq).collect::<Vec<_>>(),
        &entries
            .iter()
            .map(|e| e.kind.as_str().to_owned())
            .collect::<Vec<_>>(),
        &sources as &[Option<i64>],
        &purchases as &[Option<String>],
        &levels as &[Option<i16>],
        &rates as &[Option<Decimal>],
        &entries
            .iter()
            .map(|e| e.amount.as_decimal())
            .collect::<Vec<_>>(),
        &entries.iter().map(|e| e.currency.clone()).collect::<Vec<_>>(),
        &refers as &[Option<i64>],
        &refunds as &[Option<String>],
        &entries
            .iter()
            .map(|e| serde_json::to_string(&e.totals).expect("totals serialise"))
            .collect::<Vec<_>>(),
    )
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Writes back the changed earners' `seq`, total and balances.
async fn write_earners(
    tx: &mut PgConnection,
    earners: &HashMap<UserId, Earner>,
) -> sqlx::Result<()> {
    let changed: Vec<(&UserId, &Earner)> = earners.iter().filter(|(_, e)| e.changed).collect();
    if changed.is_empty() {
        return Ok(());
    }
    let column = |f: fn(&Earner) -> Money| -> Vec<Decimal> {
        changed.iter().map(|(_, e)| f(e).as_decimal()).collect()
    };
    sqlx::query!(
        r#"update earner_balances b set earnings_seq = t.seq, total_earnings = t.total, pending_earnings = t.pending,
                              approved_earnings = t.approved, paid_earnings = t.paid, reversed_earnings = t.reversed
           from unnest($1::int8[], $2::int8[], $3::numeric[], $4::numeric[], $5::numeric[], $6::numeric[], $7::numeric[])
                as t(id, seq, total, pending, approved, paid, reversed)
           where b.user_id = t.id"#,
        &changed.iter().map(|(id, _)| id.get()).collect::<Vec<_>>(),
        &changed.iter().map(|(_, e)| e.seq).collect::<Vec<_>>(),
        &column(|e| e.total),
        &column(|e| e.balances.pending),
        &column(|e| e.balances.approved),
        &column(|e| e.balances.paid),
        &column(|e| e.balances.reversed),
    )
    .execute(&mut *tx)
    .await?;
    Ok(())
}
