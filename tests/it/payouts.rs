//! Payout batches and refund requests over REST (contract §10): batches of approved balances
//! over `payout.minimum`, idempotent creation, the CSV export, marking a batch paid (ledger
//! entries, balances, the earning event), later batches; refund validation and conflicts.

use rust_decimal::Decimal;
use serde_json::{json, Value};
use upline_common::protocol::ServerMessage;
use upline_common::rules::EntryKind;

use crate::harness::{Services, TestApp, User, PRODUCER};

/// An app whose commissions are approved at once (`commission.hold_days = 0`), so that there
/// is approved money to pay out without waiting out a holding period.
async fn app_without_hold() -> TestApp {
    TestApp::spawn_with(Services::default(), |s| {
        s.commission.hold_days = "0".into();
    })
    .await
}

/// A user's balances as stored: (approved, paid, earnings_seq).
async fn balances(app: &TestApp, user: &User) -> (String, String, i64) {
    let row: (Decimal, Decimal, i64) = sqlx::query_as(
        "select approved_earnings, paid_earnings, earnings_seq from earner_balances where user_id = $1",
    )
    .bind(user.id)
    .fetch_one(&app.db)
    .await
    .expect("user row");
    (format!("{:.2}", row.0), format!("{:.2}", row.1), row.2)
}

/// The (user_id, amount, through_seq) of each line of a batch.
fn lines(batch: &Value) -> Vec<(i64, String, i64)> {
    batch["lines"]
        .as_array()
        .unwrap_or_else(|| panic!("no lines: {batch}"))
        .iter()
        .map(|l| {
            (
                l["user_id"].as_i64().expect("user_id"),
                l["amount"].as_str().expect("amount").to_owned(),
                l["through_seq"].as_i64().expect("through_seq"),
            )
        })
        .collect()
}

/// Posts a purchase and waits until a worker processed it.
async fn buy(app: &TestApp, purchase_id: &str, buyer: &User, amount: &str) {
    app.purchase(purchase_id, buyer.id, amount).await;
    app.wait_processed(purchase_id).await;
}

#[tokio::test]
async fn a_payout_batch_pays_approved_balances_over_the_minimum_once() {
    let app = app_without_hold().await;
    // A ← B ← C: C's 20000 pays B 1000.00 (level 1) and A 200.00 (level 2, under the
    // 500.00 minimum). D ← E: E's 12000 pays D 600.00.
    let (a, b, c) = app.chain_abc().await;
    let d = app.register("Dev \"Dee\", Jr", None).await;
    let e = app.register("Esha", Some(d.id)).await;
    buy(&app, "po-1", &c, "20000").await;
    buy(&app, "po-2", &e, "12000").await;
    assert_eq!(
        balances(&app, &b).await,
        ("1000.00".into(), "0.00".into(), 1)
    );

    // Missing key, then a batch, then the same request again: one batch.
    let (status, problem) = app
        .client
        .create_payout(None, &json!({"label": "November"}))
        .await
        .expect("request");
    assert_eq!(
        (status, problem["code"].as_str(), problem["field"].as_str()),
        (
            422,
            Some("idempotency_key_required"),
            Some("idempotency_key")
        )
    );
    let (status, problem) = app
        .client
        .create_payout(Some("po-key-1"), &json!({"label": "x".repeat(101)}))
        .await
        .expect("request");
    assert_eq!((status, problem["field"].as_str()), (422, Some("label")));
    let (status, batch) = app
        .client
        .create_payout(Some("po-key-1"), &json!({"label": "November"}))
        .await
        .expect("request");
    assert_eq!(status, 201, "{batch}");
    let id = batch["id"].as_i64().expect("id");
    assert_eq!(batch["status"], "created");
    assert_eq!(batch["label"], "November");
    assert_eq!(batch["total"], "1600.00");
    assert_eq!(batch["line_count"], 2);
    assert_eq!(batch["minimum"], "500.00");
    assert!(batch["period_start"].is_null(), "{batch}");
    assert_eq!(
        lines(&batch),
        vec![(b.id, "1000.00".into(), 1), (d.id, "600.00".into(), 1)]
    );
    let (status, again) = app
        .client
        .create_payout(
            None,
            &json!({"label": "November", "idempotency_key": "po-key-1"}),
        )
        .await
        .expect("request");
    assert_eq!((status, again["id"].as_i64()), (200, Some(id)));
    let (status, problem) = app
        .client
        .create_payout(Some("po-key-1"), &json!({"label": "December"}))
        .await
        .expect("request");
    assert_eq!(
        (status, problem["code"].as_str()),
        (409, Some("idempotency_conflict"))
    );
    let (_, page) = app.admin_get("/api/payouts").await;
    assert_eq!(page["items"].as_array().map(Vec::len), Some(1), "{page}");
    assert_eq!(page["next_cursor"], Value::Null);

    // The CSV: exactly B and D, by user id, the name quoted.
    let (status, content_type, disposition, csv) = app
        .client
        .admin_get_text(&format!("/api/payouts/{id}.csv"))
        .await
        .expect("request");
    assert_eq!(status, 200, "{csv}");
    assert_eq!(content_type, "text/csv; charset=utf-8");
    assert_eq!(
        disposition,
        format!("attachment; filename=\"payout-{id}.csv\"")
    );
    assert_eq!(
        csv,
        format!(
            "payout_id,user_id,name,amount,currency,through_seq\n\
             {id},{},Bala,1000.00,INR,1\n\
             {id},{},\"Dev \"\"Dee\"\", Jr\",600.00,INR,1\n",
            b.id, d.id
        )
    );
    assert!(
        !csv.contains(&format!(",{},", a.id)),
        "A is under the minimum"
    );
    let (status, problem) = app.admin_get("/api/payouts/999999.csv").await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (404, Some("payout_not_found"))
    );

    // Marking it paid: a payout ledger entry per line, streamed to the earner.
    let mut ws = app.subscribe(b.id, &b.token, None).await;
    let (status, paid) = app.client.mark_payout_paid(id).await.expect("request");
    assert_eq!(
        (status, paid["status"].as_str()),
        (200, Some("paid")),
        "{paid}"
    );
    let paid_at = paid["paid_at"].as_str().expect("paid_at").to_owned();
    assert_eq!(
        balances(&app, &b).await,
        ("0.00".into(), "1000.00".into(), 2)
    );
    assert_eq!(
        balances(&app, &d).await,
        ("0.00".into(), "600.00".into(), 2)
    );
    assert_eq!(
        balances(&app, &a).await,
        ("200.00".into(), "0.00".into(), 1)
    );
    let event = loop {
        match ws.next().await {
            ServerMessage::Earning { earning } if earning.kind == EntryKind::Payout => {
                break earning
            }
            ServerMessage::Earning { .. } => {}
            other => panic!("unexpected frame {other:?}"),
        }
    };
    assert_eq!(event.seq, 2);
    assert_eq!(event.earner_id.get(), b.id);
    assert_eq!(event.amount.to_string(), "1000.00");
    assert_eq!(event.payout_id, Some(id));
    assert_eq!(event.level, None);
    assert_eq!(event.totals.balances.paid.to_string(), "1000.00");
    assert_eq!(event.totals.balances.approved.to_string(), "0.00");
    assert_eq!(event.totals.total.to_string(), "1000.00");
    let report = app.earnings(b.id).await;
    assert_eq!(report["recent"][0]["kind"], "payout", "{report}");
    assert_eq!(report["recent"][0]["totals"]["paid"], "1000.00");
    assert_eq!(report["recent"][0]["totals"]["approved"], "0.00");

    // Marking it paid again changes nothing.
    let (status, again) = app.client.mark_payout_paid(id).await.expect("request");
    assert_eq!(status, 200);
    assert_eq!(again["paid_at"].as_str(), Some(paid_at.as_str()));
    assert_eq!(
        balances(&app, &b).await,
        ("0.00".into(), "1000.00".into(), 2)
    );
    let (status, problem) = app.client.mark_payout_paid(999_999).await.expect("request");
    assert_eq!(
        (status, problem["code"].as_str()),
        (404, Some("payout_not_found"))
    );
    app.stop().await;
}

#[tokio::test]
async fn a_later_batch_skips_earners_of_an_unpaid_batch_and_pays_what_came_since() {
    let app = app_without_hold().await;
    let b = app.register("Bala", None).await;
    let c = app.register("Chitra", Some(b.id)).await;
    let d = app.register("Dev", None).await;
    let e = app.register("Esha", Some(d.id)).await;
    let f = app.register("Farah", None).await;
    let g = app.register("Gopal", Some(f.id)).await;
    buy(&app, "later-1", &c, "20000").await; // B 1000.00
    buy(&app, "later-2", &e, "12000").await; // D 600.00
    let (status, first) = app
        .client
        .create_payout(Some("later-batch-1"), &json!({}))
        .await
        .expect("request");
    assert_eq!(status, 201, "{first}");
    let first_id = first["id"].as_i64().expect("id");
    assert_eq!(
        lines(&first),
        vec![(b.id, "1000.00".into(), 1), (d.id, "600.00".into(), 1)]
    );

    // New money for D (in the unpaid first batch) and for F (in none).
    buy(&app, "later-3", &e, "12000").await; // D +600.00: approved 1200.00
    buy(&app, "later-4", &g, "14000").await; // F 700.00
    let (status, second) = app
        .client
        .create_payout(Some("later-batch-2"), &json!({"label": "second"}))
        .await
        .expect("request");
    assert_eq!(status, 201, "{second}");
    let second_id = second["id"].as_i64().expect("id");
    assert_eq!(lines(&second), vec![(f.id, "700.00".into(), 1)]);
    assert_eq!(second["period_start"], first["period_end"]);

    // The first batch pays D 600.00 of its 1200.00; the third batch then pays D the rest,
    // and nobody twice.
    let (status, _) = app
        .client
        .mark_payout_paid(first_id)
        .await
        .expect("request");
    assert_eq!(status, 200);
    assert_eq!(
        balances(&app, &d).await,
        ("600.00".into(), "600.00".into(), 3)
    );
    let (status, third) = app
        .client
        .create_payout(Some("later-batch-3"), &json!({}))
        .await
        .expect("request");
    assert_eq!(status, 201, "{third}");
    assert_eq!(lines(&third), vec![(d.id, "600.00".into(), 3)]);
    assert_eq!(third["total"], "600.00");
    for id in [second_id, third["id"].as_i64().expect("id")] {
        let (status, _) = app.client.mark_payout_paid(id).await.expect("request");
        assert_eq!(status, 200);
    }
    assert_eq!(
        balances(&app, &b).await,
        ("0.00".into(), "1000.00".into(), 2)
    );
    assert_eq!(
        balances(&app, &d).await,
        ("0.00".into(), "1200.00".into(), 4)
    );
    assert_eq!(
        balances(&app, &f).await,
        ("0.00".into(), "700.00".into(), 2)
    );
    // Nothing is left to pay: an empty batch is allowed.
    let (status, empty) = app
        .client
        .create_payout(Some("later-batch-4"), &json!({}))
        .await
        .expect("request");
    assert_eq!(status, 201, "{empty}");
    assert_eq!(
        (empty["total"].as_str(), empty["line_count"].as_i64()),
        (Some("0.00"), Some(0))
    );
    let (_, page) = app.admin_get("/api/payouts?limit=2").await;
    let ids: Vec<i64> = page["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|p| p["id"].as_i64().expect("id"))
        .collect();
    assert_eq!(ids.len(), 2);
    assert!(ids[0] > ids[1], "newest first: {ids:?}");
    let cursor = page["next_cursor"].as_str().expect("a next page");
    let (_, rest) = app
        .admin_get(&format!("/api/payouts?limit=2&cursor={cursor}"))
        .await;
    assert_eq!(rest["items"].as_array().map(Vec::len), Some(2), "{rest}");
    assert_eq!(rest["items"][1]["id"].as_i64(), Some(first_id));
    app.stop().await;
}

#[tokio::test]
async fn refund_requests_are_validated_and_a_reused_refund_id_conflicts() {
    let app = TestApp::spawn().await;
    let (_, _, c) = app.chain_abc().await;
    buy(&app, "rf-ord-1", &c, "2000").await;
    let post = |purchase: &'static str, body: Value| {
        let client = app.client.clone();
        async move {
            let r = client.post_refund(purchase, &body).await.expect("request");
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    for (body, field) in [
        (json!({"refund_id": "rf-x", "amount": "-5"}), "amount"),
        (json!({"refund_id": "rf-x", "amount": "1.234"}), "amount"),
        (json!({"refund_id": "rf-x", "amount": 0}), "amount"),
        (json!({"refund_id": "rf-x", "amount": true}), "amount"),
        (json!({"amount": "5"}), "refund_id"),
        (json!({"refund_id": "rf x"}), "refund_id"),
    ] {
        let (status, problem) = post("rf-ord-1", body.clone()).await;
        assert_eq!(
            (status, problem["code"].as_str(), problem["field"].as_str()),
            (422, Some("validation_failed"), Some(field)),
            "{body}: {problem}"
        );
    }
    let r = app
        .http
        .post(app.url("/api/purchases/rf-ord-1/refunds"))
        .bearer_auth(&c.token)
        .json(&json!({"refund_id": "rf-x"}))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 403);

    // A refund a worker recorded (written here as a worker would): the same request again is
    // accepted, the same id with another amount is a conflict.
    sqlx::query(
        "insert into refunds (refund_id, purchase_id, requested, amount, status, fingerprint, applied_at)
         values ('rf-1', 'rf-ord-1', 100, 100, 'applied', 'v1|rf-ord-1|100.00', now())",
    )
    .execute(&app.db)
    .await
    .expect("insert refund");
    sqlx::query("update purchases set refunded = 100 where purchase_id = 'rf-ord-1'")
        .execute(&app.db)
        .await
        .expect("update purchase");
    let (status, problem) = post("rf-ord-1", json!({"refund_id": "rf-1", "amount": "50"})).await;
    assert_eq!(
        (status, problem["code"].as_str(), problem["field"].as_str()),
        (409, Some("refund_conflict"), Some("refund_id"))
    );
    let (status, problem) = post("rf-ord-2", json!({"refund_id": "rf-1", "amount": 100})).await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (409, Some("refund_conflict"))
    );
    let (status, accepted) = post("rf-ord-1", json!({"refund_id": "rf-1", "amount": 100})).await;
    assert_eq!(status, 202, "{accepted}");
    assert_eq!(
        accepted,
        json!({"refund_id": "rf-1", "purchase_id": "rf-ord-1", "status": "accepted"})
    );

    // What was recorded, on its own and in the purchase's report.
    let refund = |id: &'static str| {
        let http = app.http.clone();
        let url = app.url(&format!("/api/refunds/{id}"));
        async move {
            let r = http
                .get(url)
                .bearer_auth(PRODUCER)
                .send()
                .await
                .expect("request");
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let (status, recorded) = refund("rf-1").await;
    assert_eq!(status, 200, "{recorded}");
    assert_eq!(
        (
            recorded["status"].as_str(),
            recorded["requested"].as_str(),
            recorded["amount"].as_str(),
            recorded["purchase_id"].as_str()
        ),
        (
            Some("applied"),
            Some("100.00"),
            Some("100.00"),
            Some("rf-ord-1")
        )
    );
    let (status, problem) = refund("rf-never").await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (404, Some("refund_not_found"))
    );
    let (_, report) = app.admin_get("/api/purchases/rf-ord-1").await;
    assert_eq!(report["refunded"], "100.00", "{report}");
    assert_eq!(report["refunds"][0]["refund_id"], "rf-1");
    assert_eq!(report["levels"][0]["outcome"], "paid");

    // A refund of a purchase not processed (yet) is accepted: a worker parks it.
    let (status, accepted) = post("rf-ord-later", json!({"refund_id": "rf-2"})).await;
    assert_eq!(status, 202, "{accepted}");
    app.stop().await;
}
