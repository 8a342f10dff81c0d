//! Reports: referrals two levels deep, the leaderboard.

use serde_json::Value;

use crate::harness::TestApp;

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
