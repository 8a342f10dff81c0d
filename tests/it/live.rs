//! Live earnings over WebSocket and SSE (SPEC §5).

use serde_json::json;
use upline_common::events::EarningEvent;
use upline_common::protocol::{ErrorCode, ServerMessage, Target};
use upline_common::{Level, UserId};

use crate::harness::{TestApp, ADMIN};

#[tokio::test]
async fn a_websocket_subscriber_receives_its_earning() {
    let app = TestApp::spawn().await;
    let (_, b, c) = app.chain_abc().await;
    let mut ws = app.subscribe(b.id, &b.token, None).await;
    app.purchase("live-1", c.id, "2000.00").await;
    // Typed: every field is there with its type (`earning_id` a number, `created_at` an
    // RFC 3339 time).
    let e: EarningEvent = ws.earnings(1).await.remove(0);
    assert_eq!(e.earner_id.get(), b.id);
    assert_eq!(e.source_user_id.map(UserId::get), Some(c.id));
    assert_eq!(e.purchase_id.as_deref(), Some("live-1"));
    assert_eq!(
        (
            e.level.map(Level::get),
            e.rate.map(|r| r.to_string()),
            e.amount.to_string()
        ),
        (Some(1), Some("0.05".to_owned()), "100.00".to_owned())
    );
    assert_eq!((e.seq, e.currency.as_str()), (1, "INR"));
    assert_eq!(
        serde_json::to_value(&e.totals).expect("serialises"),
        json!({"total": "100.00", "level_1": "100.00", "level_2": "0.00",
               "pending": "100.00", "approved": "0.00", "paid": "0.00", "reversed": "0.00"})
    );
    app.purchase("live-2", c.id, "3000.00").await;
    let e = ws.earnings(1).await.remove(0);
    assert_eq!(
        (e.seq, e.totals.total.to_string()),
        (2, "250.00".to_owned())
    );
    app.stop().await;
}

#[tokio::test]
async fn a_bad_token_or_another_users_token_is_refused() {
    let app = TestApp::spawn().await;
    let (a, b, _) = app.chain_abc().await;
    for token in ["nonsense", a.token.as_str()] {
        let (ws, _) = tokio_tungstenite::connect_async(app.ws_url.as_str())
            .await
            .expect("connect");
        let mut ws = crate::harness::Ws(ws);
        ws.send_subscribe(b.id, token, None).await.expect("send");
        let frame = ws.next().await;
        assert!(
            matches!(&frame, ServerMessage::Error(e) if e.code == ErrorCode::Unauthorized),
            "{frame:?}"
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
    let mut ws = app.subscribe(b.id, &b.token, Some(1)).await;
    let replayed = ws.earnings(2).await;
    assert_eq!(
        replayed.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![2, 3]
    );
    app.purchase("replay-live", c.id, "2000").await;
    let live = ws.earnings(1).await.remove(0);
    assert_eq!(
        (live.seq, live.purchase_id.as_deref()),
        (4, Some("replay-live"))
    );
    // An admin may follow everyone.
    let mut all = app.subscribe(Target::All, ADMIN, None).await;
    app.purchase("for-admin", c.id, "2000").await;
    let mut seen: Vec<EarningEvent> = all.earnings(2).await;
    seen.sort_by_key(|e| e.level);
    assert_eq!(seen[0].purchase_id.as_deref(), Some("for-admin"));
    assert_eq!(seen[1].level.map(Level::get), Some(2));
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
