//! A user's ledger history (contract §10): every entry newest first with its status, paged,
//! filtered by kind, level, status and time, exported as CSV.

use serde_json::{json, Value};

use crate::harness::{Services, TestApp};

/// The seqs of a page's items.
fn seqs(page: &Value) -> Vec<i64> {
    page["items"]
        .as_array()
        .unwrap_or_else(|| panic!("no items: {page}"))
        .iter()
        .map(|i| i["seq"].as_i64().expect("seq"))
        .collect()
}

#[tokio::test]
async fn history_pages_filters_and_exports_every_ledger_entry_with_its_status() {
    let app = TestApp::spawn_with(Services::default(), |s| {
        s.commission.hold_days = "0".into();
    })
    .await;
    // A ← B ← C ← D: C's purchases pay B at level 1, D's pay B at level 2.
    let (a, b, c) = app.chain_abc().await;
    let d = app.register("Dev", Some(c.id)).await;
    for i in 0..4 {
        let id = format!("hist-c-{i}");
        app.purchase(&id, c.id, "10000").await; // B 500.00
        app.wait_processed(&id).await;
    }
    for i in 0..3 {
        let id = format!("hist-d-{i}");
        app.purchase(&id, d.id, "10000").await; // B 100.00 (level 2)
        app.wait_processed(&id).await;
    }
    // Paid out through seq 7 (payout entry seq 8); then one more commission (seq 9).
    let (status, batch) = app
        .client
        .create_payout(Some("hist-batch"), &json!({}))
        .await
        .expect("request");
    assert_eq!(status, 201, "{batch}");
    let payout_id = batch["id"].as_i64().expect("id");
    let (status, _) = app
        .client
        .mark_payout_paid(payout_id)
        .await
        .expect("request");
    assert_eq!(status, 200);
    app.purchase("hist-c-last", c.id, "10000").await;
    app.wait_processed("hist-c-last").await;

    let history = |query: &str| format!("/api/users/{}/earnings/history{query}", b.id);
    // Pages of 4, newest first.
    let (status, first) = app.admin_get(&history("?limit=4")).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(seqs(&first), vec![9, 8, 7, 6]);
    assert_eq!(first["items"][0]["status"], "approved");
    assert_eq!(first["items"][0]["kind"], "commission");
    assert_eq!(first["items"][0]["level"], 1);
    assert_eq!(first["items"][0]["source_user_id"].as_i64(), Some(c.id));
    assert_eq!(first["items"][1]["kind"], "payout");
    assert_eq!(first["items"][1]["status"], "paid");
    assert_eq!(first["items"][1]["amount"], "2300.00");
    assert_eq!(first["items"][1]["payout_id"].as_i64(), Some(payout_id));
    assert!(first["items"][1].get("level").is_none(), "{first}");
    assert_eq!(first["items"][2]["status"], "paid");
    let cursor = first["next_cursor"].as_str().expect("a next page");
    let (_, second) = app
        .admin_get(&history(&format!("?limit=4&cursor={cursor}")))
        .await;
    assert_eq!(seqs(&second), vec![5, 4, 3, 2]);
    let cursor = second["next_cursor"].as_str().expect("a next page");
    let (_, third) = app
        .admin_get(&history(&format!("?limit=4&cursor={cursor}")))
        .await;
    assert_eq!(seqs(&third), vec![1]);
    assert_eq!(third["next_cursor"], Value::Null);

    // Filters, alone and together; the user's own token works too.
    for (query, expected) in [
        ("?kind=payout", vec![8]),
        ("?kind=commission&level=2", vec![7, 6, 5]),
        ("?kind=commission&level=1", vec![9, 4, 3, 2, 1]),
        ("?status=approved", vec![9]),
        ("?status=paid", vec![8, 7, 6, 5, 4, 3, 2, 1]),
        ("?status=paid&level=1&limit=2", vec![4, 3]),
        ("?status=pending", vec![]),
        ("?status=reversed", vec![]),
        ("?from=2000-01-01T00:00:00Z&to=2000-01-02T00:00:00Z", vec![]),
        ("?from=2000-01-01T00:00:00Z&kind=payout", vec![8]),
    ] {
        let r = app
            .http
            .get(app.url(&history(query)))
            .bearer_auth(&b.token)
            .send()
            .await
            .expect("request");
        assert_eq!(r.status(), 200, "{query}");
        let page: Value = r.json().await.expect("json");
        assert_eq!(seqs(&page), expected, "{query}");
    }

    // Bad parameters are named; someone else's history is forbidden.
    for (query, field) in [
        ("?status=bogus", "status"),
        ("?kind=bonus", "kind"),
        ("?level=0", "level"),
        ("?level=3", "level"),
        ("?from=yesterday", "from"),
        ("?to=2026-13-01T00:00:00Z", "to"),
        ("?limit=501", "limit"),
        ("?cursor=abc", "cursor"),
        ("?format=xml", "format"),
    ] {
        let (status, problem) = app.admin_get(&history(query)).await;
        assert_eq!(
            (status, problem["field"].as_str()),
            (422, Some(field)),
            "{query}: {problem}"
        );
    }
    let r = app
        .http
        .get(app.url(&history("")))
        .bearer_auth(&a.token)
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 403);
    let (status, _) = app.admin_get("/api/users/999999/earnings/history").await;
    assert_eq!(status, 404);

    // CSV: every matching entry, whatever `limit`, with the same columns.
    let (status, content_type, disposition, csv) = app
        .client
        .admin_get_text(&history("?format=csv&kind=commission&limit=1"))
        .await
        .expect("request");
    assert_eq!(status, 200, "{csv}");
    assert_eq!(content_type, "text/csv; charset=utf-8");
    assert_eq!(
        disposition,
        format!("attachment; filename=\"earnings-{}.csv\"", b.id)
    );
    let rows: Vec<&str> = csv.lines().collect();
    assert_eq!(
        rows[0],
        "earning_id,seq,kind,status,amount,currency,level,source_user_id,purchase_id,refers_to,refund_id,payout_id,created_at"
    );
    assert_eq!(rows.len(), 1 + 8, "{csv}");
    let last: Vec<&str> = rows[1].split(',').collect();
    assert_eq!(
        &last[1..9],
        &[
            "9",
            "commission",
            "approved",
            "500.00",
            "INR",
            "1",
            &c.id.to_string(),
            "hist-c-last"
        ]
    );
    let (_, _, _, payouts) = app
        .client
        .admin_get_text(&history("?format=csv&kind=payout"))
        .await
        .expect("request");
    let row: Vec<&str> = payouts.lines().nth(1).expect("a row").split(',').collect();
    assert_eq!(
        (row[2], row[3], row[4], row[11]),
        ("payout", "paid", "2300.00", payout_id.to_string().as_str())
    );
    app.stop().await;
}
