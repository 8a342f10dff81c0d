//! `upline-demo`: builds a realistic referral forest through the running api, drives a stream
//! of purchases (half over REST, half published straight onto `upline.purchases` through the
//! api's own publisher), waits until every purchase is processed, prints what was paid by
//! level, refunds about 5 % of the purchases (some in part, some after their commissions were
//! approved; contract §10), and checks the ledger against the commission oracle
//! (`upline_testkit::oracle`), clawbacks included.
//!
//! It reads the same configuration as `upline` (`config/upline.toml`, `UPLINE__…`,
//! `DATABASE_URL`, `AMQP_URL`): the database, the broker and the admin and producer keys of the
//! pipeline it drives. Run it with `scripts/demo` against a pipeline started by `scripts/run`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use backon::Retryable;
use clap::Parser;
use futures_util::stream::{self, StreamExt};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rust_decimal::Decimal;
use secrecy::ExposeSecret;
use tokio_util::sync::CancellationToken;
use upline_common::amqp::Publisher;
use upline_common::purchase::PurchaseId;
use upline_common::refund::{Refund, RefundId};
use upline_common::rules::Outcome;
use upline_common::{Level, PurchaseStatus, Settings, UserId};
use upline_testkit::client::{while_unavailable, Api, NewUser};
use upline_testkit::oracle;
use upline_testkit::order::{self, Order};

/// upline-demo: drive a realistic referral forest and purchase stream through the running
/// pipeline and check what was paid against an independent recomputation.
#[derive(Debug, Parser)]
#[command(version)]
struct DemoArgs {
    /// Base URL of the running api.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub api: String,
    /// Users in the referral forest.
    #[arg(long, default_value_t = 3000)]
    pub users: usize,
    /// Purchases to drive (half over REST, half straight onto the queue).
    #[arg(long, default_value_t = 6000)]
    pub purchases: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Random seed (the same seed gives the same forest shape and amounts).
    #[arg(long, default_value_t = 2026)]
    pub seed: u64,
}

/// A planned user: index of its referrer in the plan (if any).
struct PlannedUser {
    referrer: Option<usize>,
    depth: usize,
}

/// A planned purchase: the index of its buyer in the plan.
struct PlannedPurchase {
    id: String,
    buyer: usize,
    amount: Decimal,
    profit: Option<Decimal>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = DemoArgs::parse();
    let settings = upline_testkit::tool_settings()?;
    run(&settings, args, upline_common::shutdown::signal()).await
}

/// Runs the demo.
///
/// # Errors
/// The pipeline is not running, a request fails, or the check finds a difference.
async fn run(settings: &Settings, args: DemoArgs, cancel: CancellationToken) -> anyhow::Result<()> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let api = Api::new(
        http,
        &args.api,
        settings.auth.admin_token.expose_secret(),
        settings.auth.producer_token.expose_secret(),
    );
    if !api.is_ready().await {
        bail!(
            "the pipeline is not answering at {}; start it first with `scripts/run`",
            api.url("/readyz")
        );
    }
    let rules = settings.commission.rules()?;
    let db = upline_common::db::connect_and_migrate(&settings.database, &cancel).await?;
    let mut rng = StdRng::seed_from_u64(args.seed);
    let run_id = format!("{:x}", time::OffsetDateTime::now_utc().unix_timestamp());
    let max_direct = usize::try_from(settings.referrals.max_direct).unwrap_or(0);

    // 1. The forest: ~4 % roots; everyone else joins under an existing user with room, chosen
    //    by preferential attachment (people with referrals attract more): a heavy tail capped
    //    at max_direct.
    let plan = plan_forest(&mut rng, args.users, max_direct);
    let started = Instant::now();
    let ids = register(&api, &run_id, &plan, args.concurrency).await?;
    let deepest = plan.iter().map(|u| u.depth).max().unwrap_or(0);
    let roots = plan.iter().filter(|u| u.referrer.is_none()).count();
    println!(
        "registered {} users over REST in {:.1}s: {roots} roots, deepest chain {deepest} levels",
        ids.len(),
        started.elapsed().as_secs_f64()
    );

    // 2. Some people leave: deactivate ~3 %.
    let mut inactive = 0;
    for &id in &ids {
        if rng.gen_bool(0.03) {
            api.deactivate(id).await?;
            inactive += 1;
        }
    }
    println!("deactivated {inactive} users");

    // 3. Purchases: 55 % small (50–1000), the rest a long tail above 1000; 20 % carry a profit.
    let purchases: Vec<PlannedPurchase> = (0..args.purchases)
        .map(|i| {
            let amount = if rng.gen_bool(0.55) {
                paise(&mut rng, 5_000, 100_000)
            } else {
                // log-uniform from 1000.01 to 500000
                let exp: f64 = rng.gen_range(0.0..(500.0f64).ln());
                let rupees = 1000.01 * exp.exp();
                Decimal::new((rupees * 100.0) as i64, 2)
            };
            let profit = rng.gen_bool(0.2).then(|| {
                let share = Decimal::new(rng.gen_range(5..40), 2);
                (amount * share).round_dp(2)
            });
            PlannedPurchase {
                id: format!("demo-{run_id}-{i}"),
                buyer: rng.gen_range(0..plan.len()),
                amount,
                profit,
            }
        })
        .collect();
    let orders: Vec<Order> = purchases
        .iter()
        .map(|p| Order {
            purchase_id: p.id.clone(),
            buyer_id: ids[p.buyer],
            amount: p.amount,
            profit: p.profit,
        })
        .collect();
    let publisher = Publisher::new(settings.amqp.clone(), Default::default())
        .with_connection_name("upline-demo");
    let started = Instant::now();
    let (rest, queue): (Vec<_>, Vec<_>) = orders.iter().enumerate().partition(|(i, _)| i % 2 == 0);
    let rest: Vec<Order> = rest.into_iter().map(|(_, o)| o.clone()).collect();
    let rest_task = {
        let api = api.clone();
        let concurrency = args.concurrency;
        tokio::spawn(async move {
            let results: Vec<anyhow::Result<()>> = stream::iter(rest)
                .map(|o| {
                    let api = api.clone();
                    async move { api.purchase(&o).await }
                })
                .buffer_unordered(concurrency)
                .collect()
                .await;
            results
                .into_iter()
                .collect::<anyhow::Result<Vec<()>>>()
                .map(|sent| sent.len())
        })
    };
    // A few producers retry: 5 % of the queued purchases are published twice; they must pay once.
    let republished: Vec<Order> = queue
        .iter()
        .filter(|(i, _)| i % 40 == 1)
        .map(|(_, o)| (*o).clone())
        .collect();
    let mut queued: Vec<Order> = queue.iter().map(|(_, o)| (*o).clone()).collect();
    queued.extend(republished.iter().cloned());
    order::publish(&publisher, &queued, &rules.currency)
        .await
        .context("publishing onto upline.purchases")?;
    let republished = republished.len();
    let rest_sent = rest_task.await.context("REST producer task")??;
    publisher.close().await;
    let sent = started.elapsed();
    println!(
        "sent {} purchases in {:.1}s: {rest_sent} over REST, {} straight onto the queue (+{republished} republished duplicates)",
        purchases.len(),
        sent.as_secs_f64(),
        queue.len()
    );

    // 4. Wait until every purchase is processed.
    let prefix = format!("demo-{run_id}-%");
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let done: i64 =
            sqlx::query_scalar("select count(*) from purchases where purchase_id like $1")
                .bind(&prefix)
                .fetch_one(&db)
                .await?;
        eprint!("\r  processed {done}/{}   ", purchases.len());
        if done as usize >= purchases.len() {
            eprintln!();
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "only {done} of {} purchases were processed within 5 minutes",
                purchases.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let total_time = started.elapsed();
    println!(
        "all {} purchases processed {:.1}s after the first was sent ({:.0} purchases/s end to end)",
        purchases.len(),
        total_time.as_secs_f64(),
        purchases.len() as f64 / total_time.as_secs_f64()
    );

    // 5. What was paid, by level.
    let rows: Vec<(Level, Outcome, i64, Decimal)> = sqlx::query_as(
        r#"select l.level, l.outcome, count(*), coalesce(sum(l.amount), 0)
           from purchase_level_outcomes l where l.purchase_id like $1 group by 1, 2 order by 1, 2"#,
    )
    .bind(&prefix)
    .fetch_all(&db)
    .await?;
    println!(
        "\n{:<6} {:<8} {:>9} {:>9} {:>9} {:>11} {:>16}",
        "level", "rate", "paid", "inactive", "below", "no_referrer", "amount (INR)"
    );
    let mut paid_by_level: HashMap<i16, Decimal> = HashMap::new();
    for (level, rate) in Level::up_to(rules.rates.len()).zip(&rules.rates) {
        let count = |o: Outcome| {
            rows.iter()
                .filter(|r| r.0 == level && r.1 == o)
                .map(|r| r.2)
                .sum::<i64>()
        };
        let amount: Decimal = rows.iter().filter(|r| r.0 == level).map(|r| r.3).sum();
        paid_by_level.insert(i16::from(level), amount);
        println!(
            "{:<6} {:<8} {:>9} {:>9} {:>9} {:>11} {:>16}",
            level,
            format!("{}%", (rate * Decimal::ONE_HUNDRED).normalize()),
            count(Outcome::Paid) + count(Outcome::Capped),
            count(Outcome::Inactive),
            count(Outcome::BelowThreshold),
            count(Outcome::NoReferrer),
            amount.round_dp(2)
        );
    }
    let statuses: Vec<(PurchaseStatus, i64)> = sqlx::query_as(
        "select status, count(*) from purchases where purchase_id like $1 group by 1",
    )
    .bind(&prefix)
    .fetch_all(&db)
    .await?;
    let statuses: Vec<String> = statuses.iter().map(|(s, n)| format!("{s} {n}")).collect();
    println!("purchases by status: {}", statuses.join(", "));

    // 6. Refunds: about 5 % of the purchases, 60 % of them in part. Half right away, while
    //    their commissions are held; half once the holding period is over, so that they claw
    //    back approved money.
    let refunds = plan_refunds(&mut rng, &purchases, &run_id);
    let (early, late): (Vec<_>, Vec<_>) = refunds.iter().cloned().partition(|r| r.early);
    let publisher = Publisher::new(settings.amqp.clone(), Default::default())
        .with_connection_name("upline-demo");
    // The early ones half over REST, half straight onto the queue.
    let (rest_refunds, queued_refunds): (Vec<_>, Vec<_>) = early
        .iter()
        .cloned()
        .enumerate()
        .partition(|(i, _)| i % 2 == 0);
    for (_, r) in &rest_refunds {
        let mut body = serde_json::json!({ "refund_id": r.refund_id });
        if let Some(amount) = r.order.amount {
            body["amount"] = serde_json::Value::String(amount.to_string());
        }
        let answer = while_unavailable(|| api.post_refund(&r.order.purchase_id, &body)).await?;
        if answer.status().as_u16() != 202 {
            bail!(
                "POST /api/purchases/{}/refunds: {} {}",
                r.order.purchase_id,
                answer.status(),
                answer.text().await.unwrap_or_default()
            );
        }
    }
    let queued_refunds: Vec<PlannedRefund> = queued_refunds.into_iter().map(|(_, r)| r).collect();
    send_refunds(&publisher, &queued_refunds).await?;
    let late_after_approval = if rules.hold <= Duration::from_secs(120) {
        wait_approved(&db, &late, rules.hold).await?;
        true
    } else {
        false
    };
    send_refunds(&publisher, &late).await?;
    publisher.close().await;
    wait_refunds(&db, &run_id, refunds.len()).await?;
    let reversed: (i64, Decimal) = sqlx::query_as(
        "select count(*), coalesce(-sum(amount), 0) from earnings where kind = 'reversal' and refund_id like $1",
    )
    .bind(format!("demo-{run_id}-rf-%"))
    .fetch_one(&db)
    .await?;
    println!(
        "refunded {} purchases ({} in part): {} commissions clawed back, {} INR; {}",
        refunds.len(),
        refunds.iter().filter(|r| r.order.amount.is_some()).count(),
        reversed.0,
        reversed.1.round_dp(2),
        if late_after_approval {
            format!(
                "{} of them after their commissions were approved",
                late.len()
            )
        } else {
            format!(
                "commission.hold_days is {:.1} days, so none waited for approval (scripts/run and scripts/demo hold for 17 s)",
                rules.hold.as_secs_f64() / 86_400.0
            )
        }
    );

    // 7. A payout run: one batch of every approved balance over payout.minimum, marked paid
    //    (what finance does once it has executed the transfers).
    let (status, batch) = api
        .create_payout(
            Some(&format!("demo-{run_id}-payout")),
            &serde_json::json!({ "label": format!("demo run {run_id}") }),
        )
        .await?;
    if status != 201 && status != 200 {
        bail!("POST /api/payouts: {status} {batch}");
    }
    let payout_id = batch["id"].as_i64().context("a payout id")?;
    let (status, paid) = api.mark_payout_paid(payout_id).await?;
    if status != 200 {
        bail!("POST /api/payouts/{payout_id}/paid: {status} {paid}");
    }
    println!(
        "payout batch {payout_id}: {} earners with at least {} INR approved, {} INR in total, marked paid",
        batch["line_count"],
        batch["minimum"].as_str().unwrap_or("?"),
        batch["total"].as_str().unwrap_or("?")
    );

    // 8. Independent recomputation from the database's users and the purchases as sent.
    if rules.cap_per_level.is_some() {
        println!("commission.cap_per_level is set: the recomputation below ignores caps, so it is skipped");
        return Ok(());
    }
    let refund_orders: Vec<oracle::RefundOrder> = refunds.iter().map(|r| r.order.clone()).collect();
    let expected = oracle::recompute_with_refunds(&db, &orders, &refund_orders, &rules).await?;
    let mut differences = oracle::compare(&db, &format!("demo-{run_id}-"), &expected).await?;
    for (level, want) in &expected.by_level {
        let got = paid_by_level.get(level).copied().unwrap_or_default();
        if got != *want {
            differences.push(format!("level {level}: expected {want}, recorded {got}"));
        }
    }
    if !differences.is_empty() {
        for d in &differences {
            println!("  {d}");
        }
        bail!(
            "check FAILED: {} difference(s) between the ledger and the recomputation",
            differences.len()
        );
    }
    if reversed.1 != expected.reversed {
        bail!(
            "check FAILED: refunds clawed back {} INR, the recomputation says {}",
            reversed.1,
            expected.reversed
        );
    }
    let earned: Decimal = expected.by_level.values().sum();
    println!(
        "check passed: {} earnings to {} earners, {} INR credited and {} INR clawed back, equal to an independent recomputation, level by level and earner by earner",
        expected.count,
        expected.by_earner.len(),
        earned.round_dp(2),
        expected.reversed.round_dp(2)
    );
    Ok(())
}

/// A planned refund.
#[derive(Clone)]
struct PlannedRefund {
    refund_id: String,
    order: oracle::RefundOrder,
    /// Sent at once (else after the holding period).
    early: bool,
}

/// About 5 % of the purchases: 60 % refunded in part (10 %–90 % of the amount), the rest in
/// full; every other one early.
fn plan_refunds(
    rng: &mut StdRng,
    purchases: &[PlannedPurchase],
    run_id: &str,
) -> Vec<PlannedRefund> {
    let chosen: Vec<&PlannedPurchase> = purchases.iter().filter(|_| rng.gen_bool(0.05)).collect();
    chosen
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            let amount = rng.gen_bool(0.6).then(|| {
                let share = Decimal::new(rng.gen_range(10..90), 2);
                (p.amount * share).round_dp(2).max(Decimal::new(1, 2))
            });
            PlannedRefund {
                refund_id: format!("demo-{run_id}-rf-{i}"),
                order: oracle::RefundOrder {
                    purchase_id: p.id.clone(),
                    amount,
                },
                early: i % 2 == 0,
            }
        })
        .collect()
}

/// Publishes refunds straight onto the queue (routing key `refund`), confirmed.
async fn send_refunds(publisher: &Publisher, refunds: &[PlannedRefund]) -> anyhow::Result<()> {
    for r in refunds {
        let refund = Refund {
            refund_id: RefundId::parse(&r.refund_id).map_err(|e| anyhow::anyhow!(e))?,
            purchase_id: PurchaseId::parse(&r.order.purchase_id).map_err(|e| anyhow::anyhow!(e))?,
            amount: r
                .order
                .amount
                .map(upline_common::Money::from_decimal)
                .transpose()?,
        };
        // Published again while unconfirmed (a node lost, say): idempotent by its refund id.
        let publish = || publisher.publish_refund(&refund);
        publish
            .retry(upline_common::amqp::backoff().with_max_times(40))
            .sleep(tokio::time::sleep)
            .await
            .context("publishing a refund")?;
    }
    Ok(())
}

/// Waits until the commissions of the purchases `refunds` name are no longer held (the
/// workers' schedule approved them), at most the hold plus two minutes.
async fn wait_approved(
    db: &sqlx::PgPool,
    refunds: &[PlannedRefund],
    hold: Duration,
) -> anyhow::Result<()> {
    let ids: Vec<String> = refunds
        .iter()
        .map(|r| r.order.purchase_id.clone())
        .collect();
    let deadline = Instant::now() + hold + Duration::from_secs(120);
    loop {
        let held: i64 = sqlx::query_scalar(
            "select count(*) from commission_holds h join earnings e on e.id = h.earning_id
             where e.purchase_id = any($1)",
        )
        .bind(&ids)
        .fetch_one(db)
        .await?;
        eprint!("\r  waiting for the holding period: {held} commissions still held   ");
        if held == 0 {
            eprintln!();
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{held} commissions were still held {:?} after the hold ended",
                Duration::from_secs(120)
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Waits until every refund of the run is applied or rejected.
async fn wait_refunds(db: &sqlx::PgPool, run_id: &str, count: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let done: i64 = sqlx::query_scalar(
            "select count(*) from refunds where refund_id like $1 and status <> 'waiting'",
        )
        .bind(format!("demo-{run_id}-rf-%"))
        .fetch_one(db)
        .await?;
        if done as usize >= count {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("only {done} of {count} refunds were recorded within 2 minutes");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn paise(rng: &mut StdRng, low: i64, high: i64) -> Decimal {
    Decimal::new(rng.gen_range(low..=high), 2)
}

fn plan_forest(rng: &mut StdRng, users: usize, max_direct: usize) -> Vec<PlannedUser> {
    let mut plan: Vec<PlannedUser> = Vec::with_capacity(users);
    let mut children = Vec::with_capacity(users);
    // Users that can still take referrals, repeated by weight (1 + referrals so far).
    let mut tickets: Vec<usize> = Vec::new();
    for i in 0..users {
        let root = tickets.is_empty() || max_direct == 0 || rng.gen_bool(0.04);
        let referrer = if root {
            None
        } else {
            loop {
                let pick = tickets[rng.gen_range(0..tickets.len())];
                if children[pick] < max_direct {
                    break Some(pick);
                }
                tickets.retain(|&t| t != pick);
                if tickets.is_empty() {
                    break None;
                }
            }
        };
        let depth = referrer.map_or(0, |r: usize| plan[r].depth + 1);
        if let Some(r) = referrer {
            children[r] += 1;
            tickets.push(r);
        }
        plan.push(PlannedUser { referrer, depth });
        children.push(0);
        tickets.push(i);
    }
    plan
}

/// Registers the planned forest with the admin key: it names referrers by id (anonymous
/// sign-ups use referral codes) and is not rate-limited.
async fn register(
    api: &Api,
    run_id: &str,
    plan: &[PlannedUser],
    concurrency: usize,
) -> anyhow::Result<Vec<UserId>> {
    let mut ids: Vec<Option<UserId>> = vec![None; plan.len()];
    let deepest = plan.iter().map(|u| u.depth).max().unwrap_or(0);
    // Depth by depth, so that every referrer exists before its referrals.
    for depth in 0..=deepest {
        let wave: Vec<(usize, Option<UserId>)> = plan
            .iter()
            .enumerate()
            .filter(|(_, u)| u.depth == depth)
            .map(|(i, u)| (i, u.referrer.and_then(|r| ids[r])))
            .collect();
        let created: Vec<anyhow::Result<(usize, UserId)>> = stream::iter(wave)
            .map(|(i, referrer_id)| async move {
                let user = NewUser {
                    name: format!("Demo User {i}"),
                    email: format!("demo-{run_id}-{i}@example.com"),
                    referrer_id,
                };
                Ok((i, api.register(&user).await?.id))
            })
            .buffer_unordered(concurrency)
            .collect()
            .await;
        for c in created {
            let (i, id) = c?;
            ids[i] = Some(id);
        }
    }
    Ok(ids
        .into_iter()
        .map(|id| id.expect("every planned user registered"))
        .collect())
}
