//! The transaction that records a batch of purchases and their earnings, exactly once.
//!
//! Exactly-once comes from the database: the purchase id is the primary key of `purchases`
//! (a second delivery finds it and changes nothing), the earners' rows are locked in id order
//! in one statement (so concurrent workers never deadlock and `seq`, totals and caps stay
//! exact), and every credited earning is written to `earning_outbox` in the same transaction.
//! The batch hands its earning events back to the caller, which publishes them straight after
//! the commit; the outbox rows are the recovery path, leased to that caller for a while so
//! that no other relay publishes them meanwhile (see `outbox.rs`).
//!
//! A batch costs a fixed number of round trips whatever its size: every step is one set-based
//! statement over arrays (`unnest`). A batch without repeated purchase ids takes eight:
//! `BEGIN` (with, for a small batch, generic plans: [`GENERIC_PLANS_UP_TO`]), the purchases,
//! the buyers' uplines, its ledger gate ([`Gate`]), the earners' locks, their per-level
//! totals, every write of the plan (one statement), `COMMIT`. At most `worker.ledger_writers`
//! batches run the last five, from the gate on, at once; the last four run under the earners'
//! row locks. Taking the connection from the pool adds none while the worker is busy: the
//! worker's pool pings only a connection that sat idle
//! (`upline_common::db::Checkout::PingWhenIdle`).

pub mod lifecycle;
mod plan;

use std::collections::HashMap;

use rust_decimal::Decimal;
use serde_json::{Map, Value};
use sqlx::{PgConnection, PgPool};
use time::OffsetDateTime;
use upline_common::events::EarningEvent;
use upline_common::money::Money;
use upline_common::purchase::{Purchase, PurchaseId};
use upline_common::rules::{Balances, CommissionStatus, Outcome, Rules};
use upline_common::{Level, PurchaseStatus, UserId};

use plan::{Decision, Earner, LevelOutcome, Plan, Upline};

use crate::outbox::Lease;

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
    /// The purchase id the content is recorded under.
    pub fn purchase_id(&self) -> &PurchaseId {
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
    /// The purchase id the item is recorded under.
    pub fn purchase_id(&self) -> &PurchaseId {
        self.incoming.purchase_id()
    }

    fn fingerprint(&self) -> String {
        match &self.incoming {
            Incoming::Valid(p) => p.fingerprint(),
            Incoming::Invalid { .. } => {
                upline_common::purchase::raw_fingerprint(&Value::Object(self.body.clone()))
            }
        }
    }
}

/// A committed batch: what became of each item, and the earning events to publish.
#[derive(Debug, Clone, Default)]
pub struct Committed {
    /// One per item, in the batch's order.
    pub results: Vec<Recorded>,
    /// The credited commissions as contract §4 events, in `earning_id` order. Their outbox
    /// rows are leased to the `lease` holder given to [`record_batch`] (or to nobody).
    pub events: Vec<EarningEvent>,
}

/// One of the ledger gates (docs/perf.md, "Ledger gates" and "The gate before the earners"):
/// a batch passes its gate after it has inserted its purchases and read their uplines, and
/// before it locks its first earner; it holds the gate until its transaction ends. So at most
/// `worker.ledger_writers` purchase batches hold earners' rows at once across all workers,
/// while the next batches insert their purchases beside them. Every batch credits the same few
/// top earners; more batches under those earners' row locks at once only queue on them, and
/// that queue makes the batch holding them slower (four workers drained at 0.67–0.84× the rate
/// of one without gates). A gate is the transaction-level advisory lock
/// `(hashtext('upline.ledger_gate'), gate number)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gate(i32);

impl Gate {
    /// The gate of consumer number `consumer` (0, 1, … within its worker) when `writers`
    /// batches may hold earners at once (`worker.ledger_writers`, at least 1): `consumer mod
    /// writers`. A worker's first `writers` consumers then never wait for each other.
    ///
    /// # Panics
    /// When `writers` is 0; the settings refuse that at startup.
    pub fn for_consumer(consumer: u16, writers: u16) -> Gate {
        assert!(writers > 0, "worker.ledger_writers is at least 1");
        Gate(i32::from(consumer % writers))
    }

    /// Waits for the gate and holds it until the transaction ends. It runs right before the
    /// earners' lock statement, so a waiting batch holds no earner's row, and the lock
    /// statement's snapshot is taken once the gate is passed: it reads the earners as the
    /// batch before left them.
    async fn pass(self, tx: &mut PgConnection) -> sqlx::Result<()> {
        sqlx::query!(
            "select pg_advisory_xact_lock(hashtext('upline.ledger_gate'), $1)",
            self.0
        )
        .execute(tx)
        .await?;
        Ok(())
    }
}

/// Batches of at most this many purchases run on generic plans; larger ones are planned for
/// their size (docs/perf.md, "Planned once, not per batch").
///
/// Every ledger statement is prepared once per connection, but PostgreSQL (`plan_cache_mode =
/// auto`) kept planning the upline and lock statements anew at each execution, for their array
/// parameters: about 0.2 ms of a one-purchase batch's 1.6 ms of statements. A generic plan is
/// made once per connection and is the plan of a small batch anyway (index lookups by id).
/// Above this size the arrays' lengths may matter to the plan (the choice between hash and
/// nested-loop joins), so those batches keep the plans PostgreSQL makes for them; a drain of
/// 1,000-purchase batches ran as fast on generic plans in one test, but was not made to.
pub const GENERIC_PLANS_UP_TO: usize = 64;

/// The simple query that opens a batch's transaction, in one round trip: `BEGIN`, then `set
/// local plan_cache_mode = force_generic_plan` for a batch of at most [`GENERIC_PLANS_UP_TO`]
/// items. `None`: a plain `BEGIN` does.
fn begin_statement(items: usize) -> Option<&'static str> {
    (items <= GENERIC_PLANS_UP_TO)
        .then_some("begin; set local plan_cache_mode = force_generic_plan")
}

/// Records a batch in one transaction. Items are applied in order: an earner's `seq` follows
/// the order of the batch. Each credited earning is queued in `earning_outbox`, leased to
/// `lease.holder` for `lease.duration` when a lease is given (the caller publishes the
/// returned events itself), or free for any relay to take. With a `gate`, the transaction
/// waits for it before it locks its earners ([`Gate`]): one round trip more for a batch that
/// credits anyone. Generic plans for a small batch ([`GENERIC_PLANS_UP_TO`]) cost none: they
/// go with the `BEGIN`.
///
/// # Errors
/// Database errors; the transaction is rolled back and nothing of the batch is recorded.
pub async fn record_batch(
    pool: &PgPool,
    rules: &Rules,
    items: &[Item],
    lease: Option<&Lease>,
    gate: Option<Gate>,
) -> sqlx::Result<Committed> {
    let mut tx = match begin_statement(items.len()) {
        Some(sql) => pool.begin_with(sql).await?,
        None => pool.begin().await?,
    };
    let committed = record_in(&mut tx, rules, items, lease, gate).await?;
    tx.commit().await?;
    Ok(committed)
}

/// A batch's state: per item, its result once known; the events credited.
struct Batch<'a> {
    items: &'a [Item],
    fingerprints: Vec<String>,
    results: Vec<Option<Recorded>>,
    events: Vec<EarningEvent>,
}

async fn record_in(
    tx: &mut PgConnection,
    rules: &Rules,
    items: &[Item],
    lease: Option<&Lease>,
    gate: Option<Gate>,
) -> sqlx::Result<Committed> {
    let mut batch = Batch {
        items,
        fingerprints: items.iter().map(Item::fingerprint).collect(),
        results: vec![None; items.len()],
        events: Vec::new(),
    };
    let claimed = claim(tx, &mut batch).await?;
    credit(tx, rules, &mut batch, &claimed, lease, gate).await?;
    Ok(Committed {
        results: batch
            .results
            .into_iter()
            .map(|r| r.expect("every item gets a result"))
            .collect(),
        events: batch.events,
    })
}

/// Inserts the batch's purchases, in purchase-id order (so two batches sharing ids wait on
/// each other in one order and never deadlock). Items whose id exists already, or repeats an
/// earlier item of the batch, become duplicates or conflicts. Returns the indexes of the
/// items this transaction claimed, in batch order.
async fn claim(tx: &mut PgConnection, batch: &mut Batch<'_>) -> sqlx::Result<Vec<usize>> {
    let candidates = Candidates::of(batch.items);
    let inserted = insert_purchases(tx, batch, &candidates.in_id_order(batch.items)).await?;
    // Everything not inserted now is compared with what is stored.
    let others: Vec<usize> = (0..batch.items.len())
        .filter(|&i| {
            !candidates.is_first[i]
                || !inserted.contains(batch.items[i].incoming.purchase_id().as_str())
        })
        .collect();
    record_repeats(tx, batch, &others).await?;
    let claimed: Vec<usize> = candidates
        .first
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

/// The first item of each purchase id in a batch: the one this batch tries to insert. Later
/// items with the same id are compared with what got stored.
struct Candidates {
    /// `is_first[i]`: item `i` is the first of its purchase id in the batch.
    is_first: Vec<bool>,
    /// The indexes of the first items, in batch order.
    first: Vec<usize>,
}

impl Candidates {
    fn of(items: &[Item]) -> Candidates {
        let mut seen: std::collections::HashSet<&str> = std::collections::HashSet::new();
        let is_first: Vec<bool> = items
            .iter()
            .map(|item| seen.insert(item.incoming.purchase_id().as_str()))
            .collect();
        let first = (0..items.len()).filter(|&i| is_first[i]).collect();
        Candidates { is_first, first }
    }

    /// The first items in purchase-id order: the order rows are inserted and so locked.
    fn in_id_order(&self, items: &[Item]) -> Vec<usize> {
        let mut sorted = self.first.clone();
        sorted.sort_by(|&a, &b| {
            items[a]
                .incoming
                .purchase_id()
                .as_str()
                .cmp(items[b].incoming.purchase_id().as_str())
        });
        sorted
    }
}

/// Inserts the items at `sorted` (valid ones `processed`, invalid ones `rejected` with their
/// reason) in one statement, skipping ids that exist; returns the ids inserted.
async fn insert_purchases(
    tx: &mut PgConnection,
    batch: &Batch<'_>,
    sorted: &[usize],
) -> sqlx::Result<std::collections::HashSet<String>> {
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
    for &i in sorted {
        let item = &batch.items[i];
        ids.push(item.incoming.purchase_id().as_str().to_owned());
        fingerprints.push(batch.fingerprints[i].clone());
        bodies.push(Value::Object(item.body.clone()).to_string());
        match &item.incoming {
            Incoming::Valid(p) => {
                statuses.push(PurchaseStatus::Processed.as_str().to_owned());
                reasons.push(None);
                buyers.push(Some(p.buyer_id.get()));
                amounts.push(Some(p.amount.as_decimal()));
                currencies.push(Some(p.currency.clone()));
                profits.push(p.profit.map(Money::as_decimal));
                occurred.push(p.occurred_at);
            }
            Incoming::Invalid { reason, .. } => {
                statuses.push(PurchaseStatus::Rejected.as_str().to_owned());
                reasons.push(Some(reason.clone()));
                buyers.push(None);
                amounts.push(None);
                currencies.push(None);
                profits.push(None);
                occurred.push(None);
            }
        }
    }
    // Arrays with NULL elements (`as &[Option<_>]`) are beyond the macro's type check.
    let inserted = sqlx::query_scalar!(
        r#"insert into purchases (purchase_id, status, reason, buyer_id, amount, currency, profit, occurred_at, fingerprint, body)
           select id, status, reason, buyer, amount, currency, profit, coalesce(occurred, now()), fingerprint, body::jsonb
           from unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::numeric[], $6::text[], $7::numeric[],
                       $8::timestamptz[], $9::text[], $10::text[])
                as t(id, status, reason, buyer, amount, currency, profit, occurred, fingerprint, body)
           order by id
           on conflict (purchase_id) do nothing
           returning purchase_id"#,
        &ids,
        &statuses,
        &reasons as &[Option<String>],
        &buyers as &[Option<i64>],
        &amounts as &[Option<Decimal>],
        &currencies as &[Option<String>],
        &profits as &[Option<Decimal>],
        &occurred as &[Option<OffsetDateTime>],
        &fingerprints,
        &bodies,
    )
    .fetch_all(&mut *tx)
    .await?;
    Ok(inserted.into_iter().collect())
}

/// Records the items at `others` (ids stored already, by an earlier batch or earlier in this
/// one) as duplicates when their fingerprint matches the stored one, else as conflicts, whose
/// bodies are kept in `purchase_conflicts` (SPEC §6).
async fn record_repeats(
    tx: &mut PgConnection,
    batch: &mut Batch<'_>,
    others: &[usize],
) -> sqlx::Result<()> {
    if others.is_empty() {
        return Ok(());
    }
    let lookup: Vec<String> = others
        .iter()
        .map(|&i| batch.items[i].incoming.purchase_id().as_str().to_owned())
        .collect();
    let stored: HashMap<String, String> = sqlx::query!(
        "select purchase_id, fingerprint from purchases where purchase_id = any($1)",
        &lookup,
    )
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .map(|r| (r.purchase_id, r.fingerprint))
    .collect();
    let mut conflict_ids = Vec::new();
    let mut conflict_bodies = Vec::new();
    for &i in others {
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
        sqlx::query!(
            "insert into purchase_conflicts (purchase_id, body) select id, body::jsonb from unnest($1::text[], $2::text[]) as t(id, body)",
            &conflict_ids,
            &conflict_bodies,
        )
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

/// Credits the uplines of the claimed valid purchases, in named steps: load the buyers'
/// uplines, pass the `gate` ([`Gate`]), lock and load their earners, [`plan::plan`] the
/// shares (the pure middle), then write the plan.
async fn credit(
    tx: &mut PgConnection,
    rules: &Rules,
    batch: &mut Batch<'_>,
    claimed: &[usize],
    lease: Option<&Lease>,
    gate: Option<Gate>,
) -> sqlx::Result<()> {
    let (indexes, purchases): (Vec<usize>, Vec<&Purchase>) = claimed
        .iter()
        .filter_map(|&i| match &batch.items[i].incoming {
            Incoming::Valid(p) => Some((i, p)),
            Incoming::Invalid { .. } => None,
        })
        .unzip();
    if purchases.is_empty() {
        return Ok(());
    }
    let uplines = load_uplines(tx, &purchases, rules.rates.len()).await?;
    if let Some(gate) = gate {
        gate.pass(tx).await?;
    }
    let earners = lock_earners(tx, uplines.values().flatten().copied(), rules.rates.len()).await?;
    let plan = plan::plan(rules, &purchases, &uplines, earners);
    write_rejections(tx, &purchases, &plan.decisions).await?;
    let inserted = write_plan(tx, &plan, rules.hold, lease).await?;
    batch.events = plan
        .earnings
        .iter()
        .zip(inserted)
        .map(|(e, (id, created_at))| e.event(id, created_at))
        .collect();
    batch.events.sort_unstable_by_key(|e| e.earning_id);
    for (i, decision) in indexes.into_iter().zip(plan.decisions) {
        batch.results[i] = Some(match decision {
            Decision::Processed { earnings } => Recorded::Processed { earnings },
            Decision::UnknownBuyer { reason } => Recorded::Rejected { reason },
        });
    }
    Ok(())
}

/// Each buyer's upline, up to `levels` ancestors; a buyer that is not a user has no entry.
/// The referral graph is a forest, so the walk ends.
async fn load_uplines(
    tx: &mut PgConnection,
    purchases: &[&Purchase],
    levels: usize,
) -> sqlx::Result<HashMap<UserId, Upline>> {
    let mut buyers: Vec<i64> = purchases.iter().map(|p| p.buyer_id.get()).collect();
    buyers.sort_unstable();
    buyers.dedup();
    // Each buyer (level 0) and up to `levels` ancestors, nearest first.
    let rows = sqlx::query!(
        r#"with recursive up (buyer, level, id, referrer_id) as (
               select u.id, 0, u.id, u.referrer_id from users u where u.id = any($1)
               union all
               select up.buyer, up.level + 1, u.id, u.referrer_id from users u join up on u.id = up.referrer_id
               where up.level < $2
           )
           select buyer as "buyer!: UserId", level as "level!", id as "id!: UserId"
           from up order by buyer, level"#,
        &buyers,
        i32::try_from(levels).expect("at most 10 levels"),
    )
    .fetch_all(&mut *tx)
    .await?;
    let mut uplines: HashMap<UserId, Upline> = HashMap::new();
    for row in rows {
        let upline = uplines.entry(row.buyer).or_default();
        if row.level > 0 {
            upline.push(row.id);
        }
    }
    Ok(uplines)
}

/// Locks every earner's `earner_balances` row at once, in id order: the same order in every
/// worker. `for no key update` is enough (ids never change) and does not block readers' key
/// locks. `users` is only read, for `is_active`.
/// Returns them with their per-level totals for the first `levels` levels.
async fn lock_earners(
    tx: &mut PgConnection,
    earners: impl IntoIterator<Item = UserId>,
    levels: usize,
) -> sqlx::Result<HashMap<UserId, Earner>> {
    let mut ids: Vec<i64> = earners.into_iter().map(UserId::get).collect();
    ids.sort_unstable();
    ids.dedup();
    let mut earners = HashMap::new();
    if ids.is_empty() {
        return Ok(earners);
    }
    let rows = sqlx::query!(
        r#"select b.user_id as "id: UserId", u.is_active, b.earnings_seq, b.total_earnings,
                  b.pending_earnings, b.approved_earnings, b.paid_earnings, b.reversed_earnings
           from earner_balances b join users u on u.id = b.user_id
           where b.user_id = any($1) order by b.user_id for no key update of b"#,
        &ids,
    )
    .fetch_all(&mut *tx)
    .await?;
    for row in rows {
        let total = Money::from_total(row.total_earnings);
        let mut earner = Earner::new(row.is_active, row.earnings_seq, total, levels);
        earner.balances = Balances {
            pending: Money::from_total(row.pending_earnings),
            approved: Money::from_total(row.approved_earnings),
            paid: Money::from_total(row.paid_earnings),
            reversed: Money::from_total(row.reversed_earnings),
        };
        earners.insert(row.id, earner);
    }
    let rows = sqlx::query!(
        r#"select user_id as "user_id: UserId", level as "level: Level", total
           from earner_levels where user_id = any($1)"#,
        &ids,
    )
    .fetch_all(&mut *tx)
    .await?;
    for row in rows {
        if let Some(slot) = earners
            .get_mut(&row.user_id)
            .and_then(|e| e.levels.get_mut(row.level.index()))
        {
            *slot = Money::from_total(row.total);
        }
    }
    Ok(earners)
}

/// Marks the purchases of unknown buyers rejected, with the reason.
async fn write_rejections(
    tx: &mut PgConnection,
    purchases: &[&Purchase],
    decisions: &[Decision],
) -> sqlx::Result<()> {
    let (ids, reasons): (Vec<String>, Vec<String>) = purchases
        .iter()
        .zip(decisions)
        .filter_map(|(p, d)| match d {
            Decision::UnknownBuyer { reason } => {
                Some((p.purchase_id.as_str().to_owned(), reason.clone()))
            }
            Decision::Processed { .. } => None,
        })
        .unzip();
    if ids.is_empty() {
        return Ok(());
    }
    sqlx::query!(
        r#"update purchases p set status = 'rejected', reason = t.reason
           from unnest($1::text[], $2::text[]) as t(id, reason) where p.purchase_id = t.id"#,
        &ids,
        &reasons,
    )
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Writes a batch's plan in one statement, so that the writes made under the earners' row
/// locks take one round trip: inserts the earnings, queues them in the outbox
/// (leased to `lease`'s holder, if any), holds the pending ones in `commission_holds` until
/// `hold` from now, updates `earner_balances` (seq, money), `earner_levels` and
/// `earner_referrals` with the batch's sums per row, and inserts the `purchase_levels` rows of
/// the levels not paid in full. Returns the earnings' ids and `created_at`, in plan order.
///
/// A `paid` level is its commission earning, and readers see it through the
/// `purchase_level_outcomes` view (migration `20261203000002`). The sub-statements touch
/// different tables and see the same snapshot, taken after the earners' rows were locked;
/// `purchase_levels` takes its earning ids from the inserted rows (`positions`).
async fn write_plan(
    tx: &mut PgConnection,
    plan: &Plan,
    hold: std::time::Duration,
    lease: Option<&Lease>,
) -> sqlx::Result<Vec<(i64, OffsetDateTime)>> {
    let earnings = &plan.earnings;
    let levels: Vec<&LevelOutcome> = plan
        .levels
        .iter()
        .filter(|o| o.outcome != Outcome::Paid)
        .collect();
    if earnings.is_empty() && levels.is_empty() {
        return Ok(Vec::new());
    }
    let changed: Vec<(UserId, &Earner)> = plan.changed_earners().collect();
    let per_level = plan.level_sums();
    let per_referral = plan.referral_sums();
    // 1-based positions in `earnings`, to match `with ordinality`.
    let level_earnings: Vec<Option<i64>> = levels
        .iter()
        .map(|o| {
            o.earning
                .map(|e| i64::try_from(e + 1).expect("a batch fits in i64"))
        })
        .collect();
    let level_earners: Vec<Option<i64>> = levels
        .iter()
        .map(|o| o.earner_id.map(UserId::get))
        .collect();
    let rows = sqlx::query!(
        r#"with new as (
               insert into earnings (earner_id, seq, source_user_id, purchase_id, level, rate, amount, currency,
                                     totals, hold_until)
               select earner, seq, source, purchase, level, rate, amount, currency, totals::jsonb,
                      case when held then now() + make_interval(secs => $11) end
               from unnest($1::int8[], $2::int8[], $3::int8[], $4::text[], $5::int2[], $6::numeric[], $7::numeric[],
                           $8::text[], $9::text[], $10::bool[])
                    with ordinality as t(earner, seq, source, purchase, level, rate, amount, currency, totals, held, n)
               order by n
               returning id, earner_id, seq, hold_until, created_at
           ), positions as (
               select t.n, new.id, new.created_at
               from new join unnest($1::int8[], $2::int8[]) with ordinality as t(earner, seq, n)
                 on new.earner_id = t.earner and new.seq = t.seq
           ), queued as (
               insert into earning_outbox (earning_id, claimed_by, claimed_until)
               select id, $12::text, now() + make_interval(secs => $13) from new
           ), held as (
               insert into commission_holds (earning_id, due_at)
               select id, hold_until from new where hold_until is not null
           ), balances as (
               update earner_balances b set earnings_seq = t.seq, total_earnings = t.total,
                      pending_earnings = t.pending, approved_earnings = t.approved
               from unnest($14::int8[], $15::int8[], $16::numeric[], $17::numeric[], $18::numeric[])
                    as t(id, seq, total, pending, approved)
               where b.user_id = t.id
           ), per_level as (
               insert into earner_levels (user_id, level, total, count)
               select * from unnest($19::int8[], $20::int2[], $21::numeric[], $22::int8[])
               on conflict (user_id, level)
               do update set total = earner_levels.total + excluded.total, count = earner_levels.count + excluded.count
           ), per_referral as (
               insert into earner_referrals (user_id, source_user_id, level, total, count)
               select * from unnest($23::int8[], $24::int8[], $25::int2[], $26::numeric[], $27::int8[])
               on conflict (user_id, source_user_id, level)
               do update set total = earner_referrals.total + excluded.total, count = earner_referrals.count + excluded.count
           ), outcomes as (
               insert into purchase_levels (purchase_id, level, earner_id, outcome, rate, amount, earning_id)
               select o.purchase, o.level, o.earner, o.outcome, o.rate, o.amount, p.id
               from unnest($28::text[], $29::int2[], $30::int8[], $31::text[], $32::numeric[], $33::numeric[], $34::int8[])
                    as o(purchase, level, earner, outcome, rate, amount, earning)
               left join positions p on p.n = o.earning
           )
           select n::int4 as "n!", id as "id!", created_at as "created_at!" from positions"#,
        &earnings.iter().map(|e| e.earner_id.get()).collect::<Vec<_>>(),
        &earnings.iter().map(|e| e.seq).collect::<Vec<_>>(),
        &earnings.iter().map(|e| e.source_user_id.get()).collect::<Vec<_>>(),
        &earnings.iter().map(|e| e.purchase_id.clone()).collect::<Vec<_>>(),
        &earnings.iter().map(|e| i16::from(e.level)).collect::<Vec<_>>(),
        &earnings.iter().map(|e| e.rate).collect::<Vec<_>>(),
        &earnings.iter().map(|e| e.amount.as_decimal()).collect::<Vec<_>>(),
        &earnings.iter().map(|e| e.currency.clone()).collect::<Vec<_>>(),
        &earnings
            .iter()
            .map(|e| serde_json::to_string(&e.totals).expect("totals serialise"))
            .collect::<Vec<_>>(),
        &earnings
            .iter()
            .map(|e| e.status == CommissionStatus::Pending)
            .collect::<Vec<_>>(),
        hold.as_secs_f64(),
        lease.map(|l| l.holder.as_str()),
        // No holder: `claimed_until` is in the past, free for any relay at once.
        lease.map_or(-1.0, |l| l.duration.as_secs_f64()),
        &changed.iter().map(|(id, _)| id.get()).collect::<Vec<_>>(),
        &changed.iter().map(|(_, e)| e.seq).collect::<Vec<_>>(),
        &changed
            .iter()
            .map(|(_, e)| e.total.as_decimal())
            .collect::<Vec<_>>(),
        &changed
            .iter()
            .map(|(_, e)| e.balances.pending.as_decimal())
            .collect::<Vec<_>>(),
        &changed
            .iter()
            .map(|(_, e)| e.balances.approved.as_decimal())
            .collect::<Vec<_>>(),
        &per_level.keys().map(|k| k.0.get()).collect::<Vec<_>>(),
        &per_level.keys().map(|k| i16::from(k.1)).collect::<Vec<_>>(),
        &per_level.values().map(|v| v.0).collect::<Vec<_>>(),
        &per_level.values().map(|v| v.1).collect::<Vec<_>>(),
        &per_referral.keys().map(|k| k.0.get()).collect::<Vec<_>>(),
        &per_referral.keys().map(|k| k.1.get()).collect::<Vec<_>>(),
        &per_referral.keys().map(|k| i16::from(k.2)).collect::<Vec<_>>(),
        &per_referral.values().map(|v| v.0).collect::<Vec<_>>(),
        &per_referral.values().map(|v| v.1).collect::<Vec<_>>(),
        &levels.iter().map(|o| o.purchase_id.clone()).collect::<Vec<_>>(),
        &levels.iter().map(|o| i16::from(o.level)).collect::<Vec<_>>(),
        &level_earners as &[Option<i64>],
        &levels
            .iter()
            .map(|o| o.outcome.as_str().to_owned())
            .collect::<Vec<_>>(),
        &levels.iter().map(|o| o.rate).collect::<Vec<_>>(),
        &levels
            .iter()
            .map(|o| o.amount.as_decimal())
            .collect::<Vec<_>>(),
        &level_earnings as &[Option<i64>],
    )
    .fetch_all(&mut *tx)
    .await?;
    let mut by_position = vec![(0i64, OffsetDateTime::UNIX_EPOCH); earnings.len()];
    for row in rows {
        by_position[usize::try_from(row.n - 1).expect("ordinality starts at 1")] =
            (row.id, row.created_at);
    }
    Ok(by_position)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(id: &str) -> Item {
        Item {
            incoming: Incoming::Invalid {
                purchase_id: PurchaseId::parse(id).expect("valid id"),
                reason: "test".into(),
            },
            body: Map::new(),
        }
    }

    /// A worker's first `writers` consumers get gates of their own; the rest share them, and
    /// every worker's consumers map onto the same gates.
    #[test]
    fn consumers_take_gates_round_robin() {
        let gates: Vec<Gate> = (0..5).map(|i| Gate::for_consumer(i, 2)).collect();
        assert_eq!(gates, [Gate(0), Gate(1), Gate(0), Gate(1), Gate(0)]);
        assert!((0..4).all(|i| Gate::for_consumer(i, 1) == Gate(0)));
        assert_eq!(Gate::for_consumer(7, 8), Gate(7));
    }

    /// A small batch's `BEGIN` carries generic plans in the same round trip; a large batch
    /// begins plainly.
    #[test]
    fn a_small_batch_begins_on_generic_plans_in_the_same_round_trip() {
        let generic = "begin; set local plan_cache_mode = force_generic_plan";
        assert_eq!(begin_statement(1), Some(generic));
        assert_eq!(begin_statement(GENERIC_PLANS_UP_TO), Some(generic));
        assert_eq!(begin_statement(GENERIC_PLANS_UP_TO + 1), None);
    }

    /// The first item of each id is the candidate; candidates are inserted (and so locked) in
    /// id order whatever the batch order, so two batches sharing ids cannot deadlock.
    #[test]
    fn a_batch_claims_the_first_item_of_each_id_and_inserts_in_id_order() {
        let items: Vec<Item> = ["c", "a", "c", "b", "a"].into_iter().map(item).collect();
        let candidates = Candidates::of(&items);
        assert_eq!(candidates.is_first, [true, true, false, true, false]);
        assert_eq!(candidates.first, [0, 1, 3]);
        assert_eq!(candidates.in_id_order(&items), [1, 3, 0]);
    }
}
