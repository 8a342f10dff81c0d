//! Reports: referrals two levels deep, the leaderboard.

use std::time::Duration;

use serde_json::Value;

use crate::harness::{Services, TestApp};

#[tokio::test]
async fn referrals_show_two_levels_with_active_flags() {
    let app = TestApp::spawn().await;
    let (a, b, c) = app.chain_abc().await;
    let d = app.register("Dev", Some(a.id)).await;
    let e = app.register("Esha", Some(c.id)).await;
    app.deactivate(c.id).await;
    let r = app
        .http
        .get(app.url(&format!("/api/users/{}/referrals", a.id)))
        .bearer_auth(&a.token)
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 200);
    let tree: Value = r.json().await.expect("json");
    let ids = |level: &str| {
        tree[level]
            .as_array()
            .expect("list")
            .iter()
            .map(|u| u["id"].as_i64().expect("id"))
            .collect::<Vec<_>>()
    };
    assert_eq!(ids("level_1"), vec![b.id, d.id]);
    assert_eq!(ids("level_2"), vec![c.id]);
    assert_eq!(tree["level_2"][0]["is_active"], false);
    assert_eq!(tree["level_1"][0]["is_active"], true);
    assert!(!tree.to_string().contains(&e.id.to_string()) || ids("level_2").len() == 1);
    app.stop().await;
}

#[tokio::test]
async fn the_leaderboard_ranks_top_earners_without_emails() {
    let app = TestApp::spawn().await;
    let (a, b, c) = app.chain_abc().await;
    app.purchase("lb-1", c.id, "10000").await;
    app.wait_processed("lb-1").await;
    let mut board: Value = Value::Null;
    for _ in 0..100 {
        board = app
            .http
            .get(app.url("/api/leaderboard?limit=10"))
            .send()
            .await
            .expect("request")
            .json()
            .await
            .expect("json");
        if board.as_array().is_some_and(|l| l.len() == 2) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let list = board.as_array().expect("array");
    assert_eq!(list.len(), 2, "{board}");
    assert_eq!(
        (
            list[0]["user_id"].as_i64(),
            list[0]["total_earnings"].as_str()
        ),
        (Some(b.id), Some("500.00"))
    );
    assert_eq!(
        (
            list[1]["user_id"].as_i64(),
            list[1]["total_earnings"].as_str()
        ),
        (Some(a.id), Some("100.00"))
    );
    assert!(
        !board.to_string().contains('@'),
        "no emails on the leaderboard: {board}"
    );
    let r = app
        .http
        .get(app.url("/api/leaderboard?limit=1000"))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 422);
    app.stop().await;
}

/// The leaderboard is a snapshot (docs/contract.md §6): totals change on it only when a worker
/// refreshes it, a refresh is skipped while the last one is recent, and hidden users are left
/// out without leaving empty places: with nine in ten of the top earners hidden, the refresh
/// looks further down the table until it has its 100 entries.
#[tokio::test]
async fn the_leaderboard_is_a_snapshot_of_the_top_visible_earners() {
    // The workers refresh at start-up, then not for an hour: this test refreshes by hand.
    let app = TestApp::spawn_with(Services::default(), |s| {
        s.worker.leaderboard_refresh_ms = 3_600_000;
    })
    .await;
    // 2,000 earners with distinct totals (user i has i rupees); nine in ten hidden.
    sqlx::query(
        "insert into users (name, email, referral_code) \
         select 'Earner ' || g, 'earner' || g || '@example.com', 'board' || g \
         from generate_series(1, 2000) g",
    )
    .execute(&app.db)
    .await
    .expect("users");
    sqlx::query("update earner_balances set total_earnings = user_id")
        .execute(&app.db)
        .await
        .expect("totals");
    sqlx::query("update users set show_on_leaderboard = (id % 10 = 0)")
        .execute(&app.db)
        .await
        .expect("hide most");
    let board = || async {
        let r = app
            .http
            .get(app.url("/api/leaderboard?limit=100"))
            .send()
            .await
            .expect("request");
        assert_eq!(r.status(), 200);
        let board: Value = r.json().await.expect("json");
        board
            .as_array()
            .expect("array")
            .iter()
            .map(|l| {
                (
                    l["user_id"].as_i64().expect("id"),
                    l["total_earnings"].as_str().expect("total").to_owned(),
                )
            })
            .collect::<Vec<_>>()
    };
    let written = upline_worker::leaderboard::refresh(&app.db, Duration::ZERO)
        .await
        .expect("refresh");
    assert_eq!(written, Some(100));
    let top = board().await;
    let ids: Vec<i64> = top.iter().map(|(id, _)| *id).collect();
    let max: i64 = sqlx::query_scalar("select max(id) from users where id % 10 = 0")
        .fetch_one(&app.db)
        .await
        .expect("max id");
    assert_eq!(
        ids,
        (0..100).map(|i| max - 10 * i).collect::<Vec<_>>(),
        "the 100 largest visible earners, largest first"
    );
    assert_eq!(top[0].1, format!("{max}.00"));

    // Within the minimum age a refresh is skipped, and the snapshot stays as it was.
    sqlx::query("update earner_balances set total_earnings = 0")
        .execute(&app.db)
        .await
        .expect("zero totals");
    let skipped = upline_worker::leaderboard::refresh(&app.db, Duration::from_secs(3600))
        .await
        .expect("refresh");
    assert_eq!(skipped, None);
    assert_eq!(board().await, top);
    // A user who hides is left out at once; the snapshot itself waits for the next refresh.
    sqlx::query("update users set show_on_leaderboard = false where id = $1")
        .bind(max)
        .execute(&app.db)
        .await
        .expect("hide the top earner");
    assert_eq!(board().await, top[1..].to_vec());
    assert_eq!(
        upline_worker::leaderboard::refresh(&app.db, Duration::ZERO)
            .await
            .expect("refresh"),
        Some(0)
    );
    assert!(board().await.is_empty(), "nobody has earnings any more");
    app.stop().await;
}

/// Waits (up to 10 s) until the user's earnings report satisfies `done`; returns it.
async fn earnings_until(app: &TestApp, user_id: i64, done: impl Fn(&Value) -> bool) -> Value {
    let mut report = Value::Null;
    for _ in 0..200 {
        report = app.earnings(user_id).await;
        if done(&report) {
            return report;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("the earnings report of user {user_id} never got there: {report}");
}

#[tokio::test]
async fn reports_by_leg_put_a_level_2_buyer_inside_the_direct_referrals_leg() {
    let app = TestApp::spawn().await;
    // A ← B ← C, and A ← E: two legs of A's, B's three levels deep.
    let (a, b, c) = app.chain_abc().await;
    let e = app.register("Esha", Some(a.id)).await;

    // C buys: A earns 1 % at level 2, inside B's leg; C is no leg of A's.
    app.purchase("leg-c", c.id, "10000").await;
    app.wait_processed("leg-c").await;
    let report = earnings_until(&app, a.id, |r| r["total"] == "100.00").await;
    assert_eq!(
        report["by_leg"],
        serde_json::json!([{"leg_user_id": b.id, "name": "Bala", "total": "100.00", "count": 1,
            "by_level": {"1": "0.00", "2": "100.00"}}]),
        "{report}"
    );

    // B buys: the same leg B, now at level 1 too.
    app.purchase("leg-b", b.id, "10000").await;
    app.wait_processed("leg-b").await;
    let report = earnings_until(&app, a.id, |r| r["total"] == "600.00").await;
    assert_eq!(
        report["by_leg"],
        serde_json::json!([{"leg_user_id": b.id, "name": "Bala", "total": "600.00", "count": 2,
            "by_level": {"1": "500.00", "2": "100.00"}}]),
        "{report}"
    );

    // E buys: a second, smaller leg, listed after B's (largest total first).
    app.purchase("leg-e", e.id, "2000").await;
    app.wait_processed("leg-e").await;
    let report = earnings_until(&app, a.id, |r| r["total"] == "700.00").await;
    let legs = report["by_leg"].as_array().expect("by_leg is a list");
    assert_eq!(
        legs.iter()
            .map(|l| (l["leg_user_id"].as_i64(), l["total"].as_str()))
            .collect::<Vec<_>>(),
        vec![(Some(b.id), Some("600.00")), (Some(e.id), Some("100.00"))],
        "{report}"
    );
    assert_eq!(
        legs[1]["by_level"],
        serde_json::json!({"1": "100.00", "2": "0.00"})
    );
    // by_referral keeps listing buyers, C among them.
    assert!(
        report["by_referral"]
            .as_array()
            .expect("by_referral")
            .iter()
            .any(|r| r["source_user_id"] == c.id && r["level"] == 2),
        "{report}"
    );

    // B's own report: one leg, C, at level 1; C has no legs at all.
    let report = earnings_until(&app, b.id, |r| r["total"] == "500.00").await;
    assert_eq!(
        report["by_leg"],
        serde_json::json!([{"leg_user_id": c.id, "name": "Chitra", "total": "500.00", "count": 1,
            "by_level": {"1": "500.00", "2": "0.00"}}]),
        "{report}"
    );
    assert_eq!(app.earnings(c.id).await["by_leg"], serde_json::json!([]));
    app.stop().await;
}

#[tokio::test]
async fn reports_show_the_four_balances_from_the_ledger() {
    // Default settings hold a new commission for 30 days: it is pending.
    let app = TestApp::spawn().await;
    let (a, b, c) = app.chain_abc().await;
    app.purchase("bal-1", c.id, "10000").await;
    app.wait_processed("bal-1").await;
    let report = earnings_until(&app, b.id, |r| r["total"] == "500.00").await;
    let balances = |r: &Value| {
        ["total", "pending", "approved", "paid", "reversed"]
            .map(|k| r[k].as_str().map(str::to_owned))
    };
    assert_eq!(
        balances(&report),
        ["500.00", "500.00", "0.00", "0.00", "0.00"].map(|s| Some(s.to_owned())),
        "{report}"
    );
    assert_eq!(report["recent"][0]["kind"], "commission");
    assert_eq!(report["recent"][0]["totals"]["pending"], "500.00");
    // A refund of 4000.00 claws back 200.00 of B's held commission (contract §10).
    app.publish_refund("bal-rf", "bal-1", Some("4000.00")).await;
    let report = earnings_until(&app, b.id, |r| r["total"] == "300.00").await;
    assert_eq!(
        balances(&report),
        ["300.00", "300.00", "0.00", "0.00", "200.00"].map(|s| Some(s.to_owned())),
        "{report}"
    );
    assert_eq!(report["recent"][0]["kind"], "reversal");
    assert_eq!(report["recent"][0]["amount"], "-200.00");
    assert_eq!(report["by_level"]["1"], "300.00");
    let a_report = app.earnings(a.id).await;
    assert_eq!(a_report["reversed"], "40.00", "{a_report}");
    assert_eq!(a_report["by_leg"][0]["total"], "60.00", "{a_report}");
    app.stop().await;

    // With no holding period a commission is approved at once.
    let app = TestApp::spawn_with(Default::default(), |s| {
        s.commission.hold_days = "0".into();
    })
    .await;
    let (_, b, c) = app.chain_abc().await;
    app.purchase("bal-2", c.id, "2000").await;
    app.wait_processed("bal-2").await;
    let report = earnings_until(&app, b.id, |r| r["total"] == "100.00").await;
    assert_eq!(
        balances(&report),
        ["100.00", "0.00", "100.00", "0.00", "0.00"].map(|s| Some(s.to_owned())),
        "{report}"
    );
    app.stop().await;
}
