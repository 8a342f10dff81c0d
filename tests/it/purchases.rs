//! Purchases over REST and what they pay (SPEC §2, §6).

use std::time::Duration;

use serde_json::{json, Value};

use crate::harness::{Services, TestApp, User, ADMIN};

fn level(report: &Value, n: usize) -> (String, String) {
    let l = &report["levels"][n - 1];
    (
        l["outcome"].as_str().unwrap_or("?").to_owned(),
        l["amount"].as_str().unwrap_or("?").to_owned(),
    )
}

/// On the chain a ← b ← c, c buys `purchase_id` for Rs 2000.00, and the report shows b paid
/// 100.00 at level 1 and a paid 20.00 at level 2. Returns the report and the three users.
async fn a_paid_purchase(app: &TestApp, purchase_id: &str) -> (Value, User, User, User) {
    let (a, b, c) = app.chain_abc().await;
    app.purchase(purchase_id, c.id, "2000.00").await;
    let report = app.wait_processed(purchase_id).await;
    assert_eq!(level(&report, 1), ("paid".into(), "100.00".into()));
    assert_eq!(level(&report, 2), ("paid".into(), "20.00".into()));
    assert_eq!(report["levels"][0]["earner_id"].as_i64(), Some(b.id));
    assert_eq!(report["levels"][1]["earner_id"].as_i64(), Some(a.id));
    (report, a, b, c)
}

#[tokio::test]
async fn a_purchase_pays_five_percent_to_level_one_and_one_percent_to_level_two() {
    let app = TestApp::spawn().await;
    let (report, a, b, c) = a_paid_purchase(&app, "ord-1").await;
    assert_eq!(report["status"], "processed");

    let eb = app.earnings(b.id).await;
    assert_eq!(eb["total"], "100.00");
    assert_eq!(eb["by_level"], json!({"1": "100.00", "2": "0.00"}));
    assert_eq!(eb["by_referral"][0]["source_user_id"].as_i64(), Some(c.id));
    assert_eq!(eb["by_referral"][0]["level"], 1);
    let recent = &eb["recent"][0];
    assert_eq!(
        (
            recent["seq"].as_i64(),
            recent["amount"].as_str(),
            recent["rate"].as_str()
        ),
        (Some(1), Some("100.00"), Some("0.05"))
    );
    assert_eq!(
        recent["totals"],
        json!({"total": "100.00", "level_1": "100.00", "level_2": "0.00",
               "pending": "100.00", "approved": "0.00", "paid": "0.00", "reversed": "0.00"})
    );
    let ea = app.earnings(a.id).await;
    assert_eq!(ea["total"], "20.00");
    assert_eq!(ea["by_level"]["2"], "20.00");
    app.stop().await;
}

/// A paid level is read from its commission earning (migration `20261203000002`): the ledger
/// stores no `purchase_levels` row for it, and a purchase recorded before, with a row per
/// level, reads the same.
#[tokio::test]
async fn a_paid_level_is_its_earning_and_levels_stored_before_read_the_same() {
    let app = TestApp::spawn().await;
    let (report, ..) = a_paid_purchase(&app, "ord-paid").await;
    assert!(report["levels"][0]["earning_id"].as_i64().is_some());
    let stored: i64 =
        sqlx::query_scalar("select count(*) from purchase_levels where purchase_id = 'ord-paid'")
            .fetch_one(&app.db)
            .await
            .expect("count");
    assert_eq!(stored, 0, "paid levels are not stored twice");

    // What the ledger wrote before: a row for every level, paid ones included.
    sqlx::query(
        "insert into purchase_levels (purchase_id, level, earner_id, outcome, rate, amount, earning_id)
         select purchase_id, level, earner_id, 'paid', rate, amount, id from earnings
         where purchase_id = 'ord-paid' and kind = 'commission'",
    )
    .execute(&app.db)
    .await
    .expect("levels as stored before");
    let again = app.wait_processed("ord-paid").await;
    assert_eq!(again["levels"], report["levels"]);
    app.stop().await;
}

#[tokio::test]
async fn the_threshold_is_strict_and_commissions_round_half_to_even() {
    let app = TestApp::spawn().await;
    let (a, b, c) = app.chain_abc().await;
    app.purchase("at-1000", c.id, "1000.00").await;
    app.purchase("just-over", c.id, "1000.01").await;
    // 1000.30 × 5 % = 50.015 → 50.02 ; × 1 % = 10.003 → 10.00
    app.purchase("midpoint", c.id, "1000.30").await;
    let r = app.wait_processed("at-1000").await;
    assert_eq!(level(&r, 1), ("below_threshold".into(), "0.00".into()));
    assert_eq!(level(&r, 2), ("below_threshold".into(), "0.00".into()));
    let r = app.wait_processed("just-over").await;
    assert_eq!(
        (level(&r, 1).1, level(&r, 2).1),
        ("50.00".into(), "10.00".into())
    );
    let r = app.wait_processed("midpoint").await;
    assert_eq!(
        (level(&r, 1).1, level(&r, 2).1),
        ("50.02".into(), "10.00".into())
    );
    assert_eq!(app.earnings(b.id).await["total"], "100.02");
    assert_eq!(app.earnings(a.id).await["total"], "20.00");
    app.stop().await;
}

#[tokio::test]
async fn amounts_sent_as_json_numbers_are_read_exactly_and_profit_is_the_base() {
    let app = TestApp::spawn().await;
    let (_, b, c) = app.chain_abc().await;
    let r = app
        .post_purchase(
            json!({"purchase_id": "num-1", "buyer_id": c.id, "amount": 1000.01, "profit": 400.1}),
        )
        .await;
    assert_eq!(r.status(), 202);
    let report = app.wait_processed("num-1").await;
    assert_eq!(report["amount"], "1000.01");
    assert_eq!(report["profit"], "400.10");
    // 400.10 × 5 % = 20.005 → 20.00 (half to even); × 1 % = 4.001 → 4.00
    assert_eq!(level(&report, 1), ("paid".into(), "20.00".into()));
    assert_eq!(level(&report, 2), ("paid".into(), "4.00".into()));
    assert_eq!(app.earnings(b.id).await["total"], "20.00");
    app.stop().await;
}

#[tokio::test]
async fn bad_purchases_get_a_422_naming_the_field() {
    let app = TestApp::spawn().await;
    let (_, _, c) = app.chain_abc().await;
    for (body, field) in [
        (json!({"buyer_id": c.id}), "amount"),
        (json!({"buyer_id": c.id, "amount": "-5"}), "amount"),
        (json!({"buyer_id": c.id, "amount": "10.001"}), "amount"),
        (
            json!({"buyer_id": c.id, "amount": "1000000000000.01"}),
            "amount",
        ),
        (json!({"buyer_id": c.id, "amount": true}), "amount"),
        (json!({"amount": "5"}), "buyer_id"),
        (
            json!({"buyer_id": c.id, "amount": "5", "currency": "USD"}),
            "currency",
        ),
        (
            json!({"buyer_id": c.id, "amount": "5", "profit": "6"}),
            "profit",
        ),
        (
            json!({"buyer_id": c.id, "amount": "5", "occurred_at": "noon"}),
            "occurred_at",
        ),
        (
            json!({"purchase_id": "has space", "buyer_id": c.id, "amount": "5"}),
            "purchase_id",
        ),
        (json!({"buyer_id": 987_654, "amount": "5"}), "buyer_id"),
    ] {
        let mut body = body.clone();
        if body.get("purchase_id").is_none() {
            body["purchase_id"] = json!(format!("bad-{field}"));
        }
        let r = app.post_purchase(body.clone()).await;
        assert_eq!(r.status(), 422, "{body}");
        let problem: Value = r.json().await.expect("json");
        assert_eq!(problem["field"], field, "{body} → {problem}");
    }
    let r = app
        .http
        .post(app.url("/api/purchases"))
        .bearer_auth(ADMIN)
        .header("Idempotency-Key", "key-1")
        .json(&json!({"purchase_id": "key-2", "buyer_id": c.id, "amount": "5"}))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 422);
    app.stop().await;
}

#[tokio::test]
async fn a_purchase_without_an_idempotency_key_is_refused_so_a_retry_cannot_pay_twice() {
    let app = TestApp::spawn().await;
    let (_, _, c) = app.chain_abc().await;
    let r = app
        .post_purchase(json!({"buyer_id": c.id, "amount": "3000"}))
        .await;
    assert_eq!(r.status(), 422);
    let problem: Value = r.json().await.expect("json");
    assert_eq!(
        (problem["code"].as_str(), problem["field"].as_str()),
        (Some("idempotency_key_required"), Some("purchase_id"))
    );
    let accepted: i64 = sqlx::query_scalar("select count(*) from purchases")
        .fetch_one(&app.db)
        .await
        .expect("count");
    assert_eq!(accepted, 0);
    app.stop().await;
}

#[tokio::test]
async fn the_idempotency_key_header_names_the_purchase() {
    let app = TestApp::spawn().await;
    let (_, b, c) = app.chain_abc().await;
    for _ in 0..2 {
        let r = app
            .http
            .post(app.url("/api/purchases"))
            .bearer_auth(ADMIN)
            .header("Idempotency-Key", "hdr-42")
            .json(&json!({"buyer_id": c.id, "amount": "3000"}))
            .send()
            .await
            .expect("request");
        assert_eq!(r.status(), 202);
        let body: Value = r.json().await.expect("json");
        assert_eq!(body, json!({"purchase_id": "hdr-42", "status": "accepted"}));
    }
    app.wait_processed("hdr-42").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(app.earnings(b.id).await["total"], "150.00");
    app.stop().await;
}

#[tokio::test]
async fn inactive_earners_are_skipped_and_the_level_above_still_pays() {
    let app = TestApp::spawn().await;
    let (a, b, c) = app.chain_abc().await;
    app.deactivate(b.id).await;
    // An inactive buyer still pays its active upline.
    app.deactivate(c.id).await;
    app.purchase("p-inactive", c.id, "2000").await;
    let report = app.wait_processed("p-inactive").await;
    assert_eq!(level(&report, 1), ("inactive".into(), "0.00".into()));
    assert_eq!(level(&report, 2), ("paid".into(), "20.00".into()));
    assert_eq!(app.earnings(b.id).await["total"], "0.00");
    assert_eq!(app.earnings(a.id).await["total"], "20.00");
    // A root buyer has no referrer at any level.
    app.purchase("p-root", a.id, "5000").await;
    let report = app.wait_processed("p-root").await;
    assert_eq!(level(&report, 1).0, "no_referrer");
    assert_eq!(level(&report, 2).0, "no_referrer");
    app.stop().await;
}

#[tokio::test]
async fn the_cap_per_level_holds_under_many_concurrent_purchases() {
    let app = TestApp::spawn_with(Services::default(), |s| {
        s.commission.cap_per_level = Some("1000.00".into());
        s.worker.consumers = 8;
    })
    .await;
    let (a, b, c) = app.chain_abc().await;
    // 30 purchases of 3000 → 150 each at level 1: the cap of 1000 is crossed on the 7th.
    let posts = (0..30).map(|i| app.purchase_owned(format!("cap-{i}"), c.id, "3000.00"));
    futures_util::future::join_all(posts).await;
    app.wait_purchase_count(30, Duration::from_secs(30)).await;
    let eb = app.earnings(b.id).await;
    assert_eq!(eb["total"], "1000.00");
    let outcomes: Vec<(String, i64)> = sqlx::query_as(
        "select outcome, count(*) from purchase_level_outcomes where level = 1 group by 1 order by 1",
    )
    .fetch_all(&app.db)
    .await
    .expect("outcomes");
    assert_eq!(
        outcomes,
        vec![
            ("cap_reached".into(), 23),
            ("capped".into(), 1),
            ("paid".into(), 6)
        ]
    );
    // Level 2: 30 × 30.00 = 900 stays under the cap.
    assert_eq!(app.earnings(a.id).await["total"], "900.00");
    app.stop().await;
}

#[tokio::test]
async fn without_a_broker_purchases_answer_503_and_nothing_is_accepted() {
    let app = TestApp::spawn_with(
        Services {
            worker: false,
            broker: false,
        },
        |s| {
            s.amqp.url = "amqp://guest:guest@127.0.0.1:1/%2f".into();
        },
    )
    .await;
    let (_, _, c) = app.chain_abc().await;
    let r = app
        .post_purchase(json!({"purchase_id": "no-broker", "buyer_id": c.id, "amount": "2000"}))
        .await;
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    let problem: Value = r.json().await.expect("json");
    assert_eq!(problem["code"], "broker_unavailable");
    let (status, _) = app.admin_get("/api/purchases/no-broker").await;
    assert_eq!(status, 404);
    app.stop().await;
}

impl TestApp {
    async fn purchase_owned(&self, id: String, buyer: i64, amount: &str) {
        self.purchase(&id, buyer, amount).await;
    }
}
