//! Refunds, clawbacks and the holding period on the worker (docs/contract.md §10): refunds
//! published straight onto the queue (routing key `refund`), applied by real workers against
//! the real database; the ledger entries, balances and events they leave.

use std::time::{Duration, Instant};

use serde_json::Value;
use upline_common::protocol::Target;
use upline_common::rules::EntryKind;

use crate::harness::{Services, TestApp, ADMIN};

/// One ledger entry as stored: (seq, kind, amount).
type Entry = (i64, String, String);

/// Every ledger entry of `earner`, in seq order.
async fn entries(app: &TestApp, earner: i64) -> Vec<Entry> {
    sqlx::query_as::<_, (i64, String, String)>(
        "select seq, kind, amount::text from earnings where earner_id = $1 order by seq",
    )
    .bind(earner)
    .fetch_all(&app.db)
    .await
    .expect("entries")
}

/// Waits (up to 20 s) until the refund is stored with a status other than `waiting` (or with
/// `status` when given); returns (status, amount, reason).
async fn wait_refund(
    app: &TestApp,
    refund_id: &str,
    status: Option<&str>,
) -> (String, Option<String>, Option<String>) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let row = sqlx::query_as::<_, (String, Option<String>, Option<String>)>(
            "select status, amount::text, reason from refunds where refund_id = $1",
        )
        .bind(refund_id)
        .fetch_optional(&app.db)
        .await
        .expect("refund");
        if let Some(row) = row {
            if status.map_or(row.0 != "waiting", |s| row.0 == s) {
                return row;
            }
        }
        assert!(
            Instant::now() < deadline,
            "refund {refund_id} not recorded as {status:?} within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// (total, pending, approved, paid, reversed) of a user, as stored.
async fn balances(app: &TestApp, user: i64) -> [String; 5] {
    let row = sqlx::query_as::<_, (String, String, String, String, String)>(
        "select total_earnings::numeric(20,2)::text, pending_earnings::numeric(20,2)::text,
                approved_earnings::numeric(20,2)::text, paid_earnings::numeric(20,2)::text,
                reversed_earnings::numeric(20,2)::text
         from earner_balances where user_id = $1",
    )
    .bind(user)
    .fetch_one(&app.db)
    .await
    .expect("balances");
    [row.0, row.1, row.2, row.3, row.4]
}

fn b(total: &str, pending: &str, approved: &str, paid: &str, reversed: &str) -> [String; 5] {
    [total, pending, approved, paid, reversed].map(str::to_owned)
}

/// Contract §10: C buys for 2000.00 (B 100.00, A 20.00). A 500.00 refund claws back a quarter
/// of each commission; a refund with no amount claws back the rest, exactly; a third refund
/// finds nothing left, and a refund above the amount is rejected with its figures.
#[tokio::test]
async fn full_and_partial_refunds_claw_back_in_proportion() {
    let app = TestApp::spawn().await;
    let (a, b_, c) = app.chain_abc().await;
    app.purchase("rf-order-1", c.id, "2000.00").await;
    app.wait_processed("rf-order-1").await;

    app.publish_refund("rf-part", "rf-order-1", Some("500"))
        .await;
    let (status, amount, _) = wait_refund(&app, "rf-part", None).await;
    assert_eq!(
        (status.as_str(), amount.as_deref()),
        ("applied", Some("500.00"))
    );
    assert_eq!(
        entries(&app, b_.id).await,
        vec![
            (1, "commission".into(), "100.00".into()),
            (2, "reversal".into(), "-25.00".into())
        ]
    );
    assert_eq!(
        entries(&app, a.id).await,
        vec![
            (1, "commission".into(), "20.00".into()),
            (2, "reversal".into(), "-5.00".into())
        ]
    );
    // Held commissions (the default 30 days): the reversal voids part of what is pending.
    assert_eq!(
        balances(&app, b_.id).await,
        b("75.00", "75.00", "0.00", "0.00", "25.00")
    );

    app.publish_refund("rf-rest", "rf-order-1", None).await;
    let (status, amount, _) = wait_refund(&app, "rf-rest", None).await;
    assert_eq!(
        (status.as_str(), amount.as_deref()),
        ("applied", Some("1500.00"))
    );
    assert_eq!(
        balances(&app, b_.id).await,
        b("0.00", "0.00", "0.00", "0.00", "100.00")
    );
    assert_eq!(
        balances(&app, a.id).await,
        b("0.00", "0.00", "0.00", "0.00", "20.00")
    );
    let report = app.earnings(b_.id).await;
    assert_eq!(report["total"], "0.00", "{report}");
    assert_eq!(report["by_level"]["1"], "0.00", "{report}");

    app.publish_refund("rf-more", "rf-order-1", Some("1")).await;
    let (status, _, reason) = wait_refund(&app, "rf-more", None).await;
    assert_eq!(status, "rejected");
    assert_eq!(
        reason.as_deref(),
        Some("purchase_id: the purchase is refunded in full already")
    );

    app.purchase("rf-order-2", c.id, "2000.00").await;
    app.wait_processed("rf-order-2").await;
    app.publish_refund("rf-too-much", "rf-order-2", Some("2500.00"))
        .await;
    let (status, _, reason) = wait_refund(&app, "rf-too-much", None).await;
    assert_eq!(status, "rejected");
    assert_eq!(
        reason.as_deref(),
        Some("amount: 2500.00 exceeds the 2000.00 still refundable of the purchase's 2000.00")
    );
    // The rejected refund changed nothing: B's second commission stands whole.
    assert_eq!(
        balances(&app, b_.id).await,
        b("100.00", "100.00", "0.00", "0.00", "100.00")
    );
    let refunded: String =
        sqlx::query_scalar("select refunded::text from purchases where purchase_id = $1")
            .bind("rf-order-1")
            .fetch_one(&app.db)
            .await
            .expect("purchase");
    assert_eq!(refunded, "2000.00");
    app.stop().await;
}

/// A refund that arrives before its purchase is parked (`waiting`), never lost, and applied
/// as soon as the purchase is recorded.
#[tokio::test]
async fn a_refund_before_its_purchase_waits_and_is_applied_when_it_arrives() {
    let app = TestApp::spawn().await;
    let (_, b_, c) = app.chain_abc().await;
    app.publish_refund("rf-early", "late-order", Some("1000.00"))
        .await;
    let (status, _, _) = wait_refund(&app, "rf-early", Some("waiting")).await;
    assert_eq!(status, "waiting");
    assert!(entries(&app, b_.id).await.is_empty());

    app.purchase("late-order", c.id, "2000.00").await;
    let (status, amount, _) = wait_refund(&app, "rf-early", Some("applied")).await;
    assert_eq!(
        (status.as_str(), amount.as_deref()),
        ("applied", Some("1000.00"))
    );
    assert_eq!(
        entries(&app, b_.id).await,
        vec![
            (1, "commission".into(), "100.00".into()),
            (2, "reversal".into(), "-50.00".into())
        ]
    );
    app.stop().await;
}

/// The same refund delivered three times claws back once; the same id with another amount is
/// a conflict and changes nothing.
#[tokio::test]
async fn the_same_refund_three_times_claws_back_once() {
    let app = TestApp::spawn().await;
    let (a, b_, c) = app.chain_abc().await;
    app.purchase("dup-order", c.id, "2000.00").await;
    app.wait_processed("dup-order").await;
    for _ in 0..3 {
        app.publish_refund("rf-dup", "dup-order", Some("400.00"))
            .await;
    }
    app.publish_refund("rf-dup", "dup-order", Some("900.00"))
        .await;
    // A marker refund published last: once it is applied, everything before it was consumed.
    app.publish_refund("rf-dup-marker", "dup-order", Some("0.01"))
        .await;
    wait_refund(&app, "rf-dup-marker", None).await;
    let reversals: Vec<Entry> = entries(&app, b_.id)
        .await
        .into_iter()
        .filter(|e| e.1 == "reversal")
        .collect();
    // 400.00 → 20.00; then 0.01 more: the running share 100 × 400.01 / 2000 = 20.0005 → 20.00.
    assert_eq!(reversals, vec![(2, "reversal".into(), "-20.00".into())]);
    assert_eq!(
        balances(&app, a.id).await,
        b("16.00", "16.00", "0.00", "0.00", "4.00")
    );
    let (status, amount, _) = wait_refund(&app, "rf-dup", None).await;
    assert_eq!(
        (status.as_str(), amount.as_deref()),
        ("applied", Some("400.00"))
    );
    app.stop().await;
}

/// Twelve refunds of 200.00 against one 2000.00 purchase, consumed by two workers one message
/// at a time: exactly ten apply, two are rejected, and the clawbacks add up to the
/// commissions exactly — the purchase row's lock serialises them. Without standby consumers,
/// so that both workers' consumers consume at once.
#[tokio::test]
async fn concurrent_refunds_of_one_purchase_across_two_workers() {
    let mut app = TestApp::spawn_with(Services::default(), |s| {
        s.worker.prefetch = 1;
        s.worker.batch_size = 1;
        s.worker.standby = false;
    })
    .await;
    app.spawn_worker().await;
    let (a, b_, c) = app.chain_abc().await;
    app.purchase("busy-order", c.id, "2000.00").await;
    app.wait_processed("busy-order").await;
    let ids: Vec<String> = (0..12).map(|i| format!("rf-busy-{i}")).collect();
    futures_util::future::join_all(
        ids.iter()
            .map(|id| app.publish_refund(id, "busy-order", Some("200.00"))),
    )
    .await;
    let mut applied = 0;
    for id in &ids {
        let (status, _, reason) = wait_refund(&app, id, None).await;
        match status.as_str() {
            "applied" => applied += 1,
            "rejected" => assert_eq!(
                reason.as_deref(),
                Some("purchase_id: the purchase is refunded in full already")
            ),
            other => panic!("{id}: {other}"),
        }
    }
    assert_eq!(applied, 10);
    assert_eq!(
        balances(&app, b_.id).await,
        b("0.00", "0.00", "0.00", "0.00", "100.00")
    );
    assert_eq!(
        balances(&app, a.id).await,
        b("0.00", "0.00", "0.00", "0.00", "20.00")
    );
    // Every reversal has the next seq: no gap, no duplicate.
    let seqs: Vec<i64> = entries(&app, b_.id).await.iter().map(|e| e.0).collect();
    assert_eq!(seqs, (1..=11).collect::<Vec<_>>());
    app.stop().await;
}

/// Two workers run the holding-period schedule at once: every held commission is approved
/// exactly once, nothing stays held, and each earner's money moves from pending to approved.
#[tokio::test]
async fn hold_expiry_on_two_workers_approves_each_commission_once() {
    let mut app = TestApp::spawn_with(Services::default(), |s| {
        // 0.00002 days = 1.728 s.
        s.commission.hold_days = "0.00002".into();
        s.worker.lifecycle_interval_secs = 1;
    })
    .await;
    app.spawn_worker().await;
    let (a, b_, c) = app.chain_abc().await;
    app.publish_purchases("held", c.id, 60).await;
    app.wait_purchase_count(60, Duration::from_secs(30)).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let held: i64 = sqlx::query_scalar("select count(*) from commission_holds")
            .fetch_one(&app.db)
            .await
            .expect("count");
        if held == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{held} commissions still held");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (commissions, approvals, approved_twice): (i64, i64, i64) = sqlx::query_as(
        "select count(*) filter (where kind = 'commission'),
                count(*) filter (where kind = 'approval'),
                (select count(*) from (select refers_to from earnings where kind = 'approval'
                                       group by refers_to having count(*) > 1) t)
         from earnings",
    )
    .fetch_one(&app.db)
    .await
    .expect("counts");
    assert_eq!((commissions, approvals, approved_twice), (120, 120, 0));
    assert_eq!(
        balances(&app, b_.id).await,
        b("6000.00", "0.00", "6000.00", "0.00", "0.00")
    );
    assert_eq!(
        balances(&app, a.id).await,
        b("1200.00", "0.00", "1200.00", "0.00", "0.00")
    );
    // Seq stays gapless across commissions and approvals.
    let seqs: Vec<i64> = entries(&app, b_.id).await.iter().map(|e| e.0).collect();
    assert_eq!(seqs, (1..=120).collect::<Vec<_>>());
    app.stop().await;
}

/// A WebSocket subscriber sees a commission, its partial reversal while held, its approval
/// (of what remains), and a reversal after approval, in `seq` order with `kind` and running
/// `totals` by state.
#[tokio::test]
async fn a_subscriber_receives_reversal_and_approval_events_in_seq_order() {
    let app = TestApp::spawn_with(Services::default(), |s| {
        // 0.00004 days = 3.456 s: the first refund lands while the commission is held.
        s.commission.hold_days = "0.00004".into();
        s.worker.lifecycle_interval_secs = 1;
    })
    .await;
    let (_, b_, c) = app.chain_abc().await;
    let mut ws = app
        .subscribe(Target::User(crate::harness::user_id(b_.id)), ADMIN, None)
        .await;
    app.purchase("ws-order", c.id, "2000.00").await;
    app.publish_refund("ws-rf-1", "ws-order", Some("500.00"))
        .await;
    let first = ws.earnings(3).await;
    app.publish_refund("ws-rf-2", "ws-order", Some("1000.00"))
        .await;
    let events: Vec<_> = first.into_iter().chain(ws.earnings(1).await).collect();
    let seen: Vec<(i64, EntryKind, String)> = events
        .iter()
        .map(|e| (e.seq, e.kind, e.amount.to_string()))
        .collect();
    assert_eq!(
        seen,
        vec![
            (1, EntryKind::Commission, "100.00".into()),
            (2, EntryKind::Reversal, "-25.00".into()),
            (3, EntryKind::Approval, "75.00".into()),
            (4, EntryKind::Reversal, "-50.00".into()),
        ]
    );
    let commission = events[0].earning_id;
    assert!(events[1..].iter().all(|e| e.refers_to == Some(commission)));
    assert_eq!(events[1].refund_id.as_deref(), Some("ws-rf-1"));
    let totals: Vec<Value> = events
        .iter()
        .map(|e| serde_json::to_value(&e.totals).expect("totals"))
        .collect();
    let state = |t: &Value| {
        ["total", "pending", "approved", "paid", "reversed"]
            .map(|k| t[k].as_str().expect("money").to_owned())
    };
    assert_eq!(
        state(&totals[0]),
        b("100.00", "100.00", "0.00", "0.00", "0.00")
    );
    assert_eq!(
        state(&totals[1]),
        b("75.00", "75.00", "0.00", "0.00", "25.00")
    );
    assert_eq!(
        state(&totals[2]),
        b("75.00", "0.00", "75.00", "0.00", "25.00")
    );
    assert_eq!(
        state(&totals[3]),
        b("25.00", "0.00", "25.00", "0.00", "75.00")
    );
    app.stop().await;
}

/// Contract §10: a refund after payout claws back money already paid: the earner's approved
/// balance goes below zero, and the next payout recovers it first. The refund comes over REST.
#[tokio::test]
async fn a_refund_after_payout_overdraws_and_the_next_payout_recovers_it() {
    let app = TestApp::spawn_with(Services::default(), |s| {
        s.commission.hold_days = "0".into();
    })
    .await;
    let (a, b_, c) = app.chain_abc().await;
    app.purchase("po-order-1", c.id, "20000.00").await;
    app.wait_processed("po-order-1").await;
    // B: 1000.00 approved at once; A: 200.00, under the 500.00 minimum.
    let (status, batch) = app
        .client
        .create_payout(Some("po-1"), &serde_json::json!({"label": "first"}))
        .await
        .expect("request");
    assert_eq!(status, 201, "{batch}");
    let lines: Vec<(i64, String)> = batch["lines"]
        .as_array()
        .expect("lines")
        .iter()
        .map(|l| {
            (
                l["user_id"].as_i64().expect("id"),
                l["amount"].as_str().expect("amount").to_owned(),
            )
        })
        .collect();
    assert_eq!(lines, vec![(b_.id, "1000.00".to_owned())]);
    let id = batch["id"].as_i64().expect("id");
    let (status, paid) = app.client.mark_payout_paid(id).await.expect("request");
    assert_eq!(
        (status, paid["status"].as_str()),
        (200, Some("paid")),
        "{paid}"
    );
    assert_eq!(
        balances(&app, b_.id).await,
        b("1000.00", "0.00", "0.00", "1000.00", "0.00")
    );

    // The shop refunds the whole purchase after the payout.
    let r = app
        .client
        .post_refund("po-order-1", &serde_json::json!({"refund_id": "po-rf-1"}))
        .await
        .expect("request");
    assert_eq!(r.status(), 202);
    let (status, amount, _) = wait_refund(&app, "po-rf-1", None).await;
    assert_eq!(
        (status.as_str(), amount.as_deref()),
        ("applied", Some("20000.00"))
    );
    assert_eq!(
        balances(&app, b_.id).await,
        b("0.00", "0.00", "-1000.00", "1000.00", "1000.00")
    );
    let report = app.earnings(b_.id).await;
    assert_eq!(
        (
            report["approved"].as_str(),
            report["paid"].as_str(),
            report["total"].as_str()
        ),
        (Some("-1000.00"), Some("1000.00"), Some("0.00")),
        "{report}"
    );
    // A was never paid: the reversal takes from its approved balance, back to zero.
    assert_eq!(
        balances(&app, a.id).await,
        b("0.00", "0.00", "0.00", "0.00", "200.00")
    );

    // 1500.00 more is earned; the next payout pays 500.00: the overdraft is recovered first.
    app.purchase("po-order-2", c.id, "30000.00").await;
    app.wait_processed("po-order-2").await;
    let (status, batch) = app
        .client
        .create_payout(Some("po-2"), &serde_json::json!({}))
        .await
        .expect("request");
    assert_eq!(status, 201, "{batch}");
    assert_eq!(
        batch["lines"][0]["user_id"].as_i64(),
        Some(b_.id),
        "{batch}"
    );
    assert_eq!(batch["lines"][0]["amount"], "500.00", "{batch}");
    assert_eq!(batch["lines"].as_array().map(Vec::len), Some(1), "{batch}");
    let (status, _) = app
        .client
        .mark_payout_paid(batch["id"].as_i64().expect("id"))
        .await
        .expect("request");
    assert_eq!(status, 200);
    assert_eq!(
        balances(&app, b_.id).await,
        b("1500.00", "0.00", "0.00", "1500.00", "1000.00")
    );
    let kinds: Vec<String> = entries(&app, b_.id)
        .await
        .into_iter()
        .map(|e| e.1)
        .collect();
    assert_eq!(
        kinds,
        ["commission", "payout", "reversal", "commission", "payout"].map(str::to_owned)
    );
    // The history shows each entry with its status, newest first: the refunded commission is
    // `reversed`, the later one `paid` (approved at once and covered by the second payout).
    let (status, history) = app
        .admin_get(&format!("/api/users/{}/earnings/history", b_.id))
        .await;
    assert_eq!(status, 200, "{history}");
    let shown: Vec<(String, String, String)> = history["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|e| {
            let s = |k: &str| e[k].as_str().unwrap_or_default().to_owned();
            (s("kind"), s("status"), s("amount"))
        })
        .collect();
    let row = |k: &str, s: &str, a: &str| (k.to_owned(), s.to_owned(), a.to_owned());
    assert_eq!(
        shown,
        vec![
            row("payout", "paid", "500.00"),
            row("commission", "paid", "1500.00"),
            row("reversal", "reversed", "-1000.00"),
            row("payout", "paid", "1000.00"),
            row("commission", "reversed", "1000.00"),
        ]
    );
    app.stop().await;
}

/// Contract §10: a reversal frees cap room. With a cap of 120.00 per level, B earns 100.00
/// then 20.00 (capped); refunding the first purchase in full gives the room back, and the
/// next purchase pays in full again. The capped commission is not paid again.
#[tokio::test]
async fn a_reversal_frees_cap_room_for_later_purchases() {
    let app = TestApp::spawn_with(Services::default(), |s| {
        s.commission.cap_per_level = Some("120.00".into());
    })
    .await;
    let (_, b_, c) = app.chain_abc().await;
    app.purchase("cap-1", c.id, "2000.00").await;
    app.wait_processed("cap-1").await;
    app.purchase("cap-2", c.id, "2000.00").await;
    let second = app.wait_processed("cap-2").await;
    assert_eq!(second["levels"][0]["outcome"], "capped", "{second}");
    // The capped level's stored outcome points at the earning it credited (written in the
    // same statement as the earning, by its position in the batch).
    let (outcome_earning, earning): (Option<i64>, i64) = sqlx::query_as(
        "select (select earning_id from purchase_levels where purchase_id = 'cap-2' and level = 1), \
                (select id from earnings where purchase_id = 'cap-2' and level = 1)",
    )
    .fetch_one(&app.db)
    .await
    .expect("the capped level and its earning");
    assert_eq!(
        outcome_earning,
        Some(earning),
        "the capped level's earning_id"
    );
    app.publish_refund("cap-rf", "cap-1", None).await;
    wait_refund(&app, "cap-rf", None).await;
    app.purchase("cap-3", c.id, "2000.00").await;
    let third = app.wait_processed("cap-3").await;
    assert_eq!(
        (
            third["levels"][0]["outcome"].as_str(),
            third["levels"][0]["amount"].as_str()
        ),
        (Some("paid"), Some("100.00")),
        "{third}"
    );
    assert_eq!(
        balances(&app, b_.id).await,
        b("120.00", "120.00", "0.00", "0.00", "100.00")
    );
    app.stop().await;
}

/// Holds that fall due while no worker runs its schedule are approved as soon as a worker
/// starts: its first run is at start-up, and it works through everything due, a batch at a
/// time.
#[tokio::test]
async fn holds_that_fell_due_during_downtime_are_approved_when_a_worker_starts() {
    let mut app = TestApp::spawn_with(Services::default(), |s| {
        // 0.00001 days = 0.864 s; the running worker's next run is an hour away.
        s.commission.hold_days = "0.00001".into();
        s.worker.lifecycle_interval_secs = 3600;
    })
    .await;
    let (_, b_, c) = app.chain_abc().await;
    app.publish_purchases("downtime", c.id, 30).await;
    app.wait_purchase_count(30, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let due: i64 = sqlx::query_scalar("select count(*) from commission_holds where due_at < now()")
        .fetch_one(&app.db)
        .await
        .expect("count");
    assert_eq!(due, 60, "the holds fell due and nobody approved them yet");
    app.spawn_worker().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while balances(&app, b_.id).await[1] != "0.00" {
        assert!(Instant::now() < deadline, "the new worker did not catch up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        balances(&app, b_.id).await,
        b("3000.00", "0.00", "3000.00", "0.00", "0.00")
    );
    app.stop().await;
}

/// A refund message without a usable `refund_id` is dead-lettered with its reason, and keeps
/// its routing key there, so that `upline dlq replay` would send it back as a refund (never as
/// a purchase, which would claim the purchase id). A bad amount under usable ids is stored as
/// a rejected refund instead.
#[tokio::test]
async fn an_unreadable_refund_is_dead_lettered_as_a_refund() {
    let app = TestApp::spawn().await;
    let (conn, channel) = app.confirming_channel().await;
    for body in [
        br#"{"purchase_id":"ord-x","amount":"10.00"}"#.as_slice(),
        br#"{"refund_id":"rf-neg","purchase_id":"ord-x","amount":"-10.00"}"#.as_slice(),
    ] {
        let confirm = upline_common::amqp::publish_mandatory(
            &channel,
            upline_common::amqp::REFUND_ROUTING_KEY,
            body,
            upline_common::amqp::persistent_json(),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
        assert!(confirm.is_ack());
    }
    let dead = app.get_dead_letter().await;
    assert_eq!(dead.delivery.routing_key.as_str(), "refund");
    let reason = dead
        .delivery
        .properties
        .headers()
        .clone()
        .expect("headers")
        .inner()
        .get("x-upline-error")
        .cloned();
    assert_eq!(
        reason,
        Some(lapin::types::AMQPValue::LongString(
            "refund_id is missing".into()
        ))
    );
    let (status, _, reason) = wait_refund(&app, "rf-neg", None).await;
    assert_eq!(
        (status.as_str(), reason.as_deref()),
        ("rejected", Some("amount: must not be negative"))
    );
    // Neither was taken for a purchase.
    let purchases: i64 = sqlx::query_scalar("select count(*) from purchases")
        .fetch_one(&app.db)
        .await
        .expect("count");
    assert_eq!(purchases, 0);
    conn.close(200, "done").await.expect("close");
    app.stop().await;
}
