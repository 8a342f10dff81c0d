//! Live earnings over WebSocket and SSE (SPEC §5).

use serde_json::{json, Value};

use crate::harness::{TestApp, ADMIN};

#[tokio::test]
async fn a_websocket_subscriber_receives_its_earning() {
    let app = TestApp::spawn().await;
    let (_, b, c) = app.chain_abc().await;
    let mut ws = app.subscribe(json!(b.id), &b.token, None).await;
    app.purchase("live-1", c.id, "2000.00").await;
    let e = ws.earnings(1).await.remove(0);
    assert_eq!(e["earner_id"].as_i64(), Some(b.id));
    assert_eq!(e["source_user_id"].as_i64(), Some(c.id));
    assert_eq!(e["purchase_id"], "live-1");
    assert_eq!(
        (
            e["level"].as_i64(),
            e["rate"].as_str(),
            e["amount"].as_str()
        ),
        (Some(1), Some("0.05"), Some("100.00"))
    );
    assert_eq!(
        (e["seq"].as_i64(), e["currency"].as_str()),
        (Some(1), Some("INR"))
    );
    assert_eq!(
        e["totals"],
        json!({"total": "100.00", "level_1": "100.00", "level_2": "0.00"})
    );
    assert!(e["earning_id"].as_i64().is_some() && e["created_at"].is_string());
    app.purchase("live-2", c.id, "3000.00").await;
    let e = ws.earnings(1).await.remove(0);
    assert_eq!(
        (e["seq"].as_i64(), e["totals"]["total"].as_str()),
        (Some(2), Some("250.00"))
    );
    app.stop().await;
}

#[tokio::test]
async fn a_bad_token_or_another_users_token_is_refused() {
    let app = TestApp::spawn().await;
    let (a, b, _) = app.chain_abc().await;
    for token in ["nonsense", a.token.as_str()] {
        let (mut ws, _) = tokio_tungstenite::connect_async(app.ws_url.as_str())
            .await
            .expect("connect");
        use futures_util::SinkExt;
        ws.send(tokio_tungstenite::tungstenite::Message::Text(
            json!({"type": "subscribe", "user_id": b.id, "token": token})
                .to_string()
                .into(),
        ))
        .await
        .expect("send");
        let mut ws = crate::harness::Ws(ws);
        let frame = ws.next_json().await;
        assert_eq!(
            (frame["type"].as_str(), frame["code"].as_str()),
            (Some("error"), Some("unauthorized")),
            "{frame}"
        );
    }
    app.stop().await;
}

#[tokio::test]
async fn subscribing_with_since_replays_later_earnings_then_streams_live_ones() {
    let app = TestApp::spawn().await;
    let (_, b, c) = app.chain_abc().await;
    for i in 0..3 {
        app.purchase(&format!("replay-{i}"), c.id, "2000").await;
        app.wait_processed(&format!("replay-{i}")).await;
    }
    let mut ws = app.subscribe(json!(b.id), &b.token, Some(1)).await;
    let replayed = ws.earnings(2).await;
    assert_eq!(
        replayed
            .iter()
            .map(|e| e["seq"].as_i64())
            .collect::<Vec<_>>(),
        vec![Some(2), Some(3)]
    );
    app.purchase("replay-live", c.id, "2000").await;
    let live = ws.earnings(1).await.remove(0);
    assert_eq!(
        (live["seq"].as_i64(), live["purchase_id"].as_str()),
        (Some(4), Some("replay-live"))
    );
    // An admin may follow everyone.
    let mut all = app.subscribe(json!("*"), ADMIN, None).await;
    app.purchase("for-admin", c.id, "2000").await;
    let mut seen: Vec<Value> = all.earnings(2).await;
    seen.sort_by_key(|e| e["level"].as_i64());
    assert_eq!(seen[0]["purchase_id"], "for-admin");
    assert_eq!(seen[1]["level"], 2);
    app.stop().await;
}

#[tokio::test]
async fn sse_streams_earnings_with_seq_as_the_event_id_and_resumes_from_last_event_id() {
    let app = TestApp::spawn().await;
    let (_, b, c) = app.chain_abc().await;
    app.purchase("sse-0", c.id, "2000").await;
    app.wait_processed("sse-0").await;
    let mut resp = app
        .http
        .get(format!("{}/events/{}", app.notifier, b.id))
        .bearer_auth(&b.token)
        .header("Last-Event-ID", "0")
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    app.purchase("sse-1", c.id, "4000").await;
    let mut text = String::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while text.matches("event: earning").count() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "SSE events did not arrive: {text}"
        );
        let chunk = tokio::time::timeout(std::time::Duration::from_secs(15), resp.chunk())
            .await
            .expect("chunk in time")
            .expect("stream")
            .expect("open");
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(
        text.contains("id: 1\n") && text.contains("id: 2\n"),
        "{text}"
    );
    assert!(text.contains(r#""purchase_id":"sse-1""#), "{text}");
    let r = app
        .http
        .get(format!("{}/events/{}", app.notifier, b.id))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 401);
    let r = app
        .http
        .get(format!(
            "{}/events/{}?token={}",
            app.notifier, b.id, c.token
        ))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 403);
    app.stop().await;
}
