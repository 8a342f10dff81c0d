//! The notifier as a fan-out service people rely on (SPEC §5): replay racing live events,
//! several notifiers, slow and silent clients, broker loss.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use upline_common::events::EarningEvent;
use upline_common::protocol::{ServerMessage, Subscribe, Target};
use upline_common::Level;

use crate::harness::{server_message, subscribe_at, Services, SubscribeTarget, TestApp, ADMIN};

fn seqs(events: &[EarningEvent]) -> Vec<i64> {
    events.iter().map(|e| e.seq).collect()
}

#[tokio::test]
async fn a_replay_racing_live_purchases_has_no_gap_and_no_duplicate_at_the_seam() {
    let app = TestApp::spawn().await;
    let (_, b, c) = app.chain_abc().await;
    let total = 150;
    let publisher = {
        let app_ref = &app;
        app_ref.publish_purchases("race", c.id, total)
    };
    let subscriber = async {
        // Join mid-stream: some earnings are in the database already, others still coming.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let n: i64 = sqlx::query_scalar("select count(*) from earnings where earner_id = $1")
                .bind(b.id)
                .fetch_one(&app.db)
                .await
                .expect("count");
            if n >= 20 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "purchases are not being processed"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut ws = app.subscribe(b.id, &b.token, Some(0)).await;
        ws.earnings(total).await
    };
    let ((), events) = tokio::join!(publisher, subscriber);
    assert_eq!(seqs(&events), (1..=total as i64).collect::<Vec<_>>());
    app.stop().await;
}

#[tokio::test]
async fn clients_on_any_of_several_notifiers_get_all_their_events() {
    let mut app = TestApp::spawn().await;
    let second = app.spawn_notifier().await;
    let (a, b, c) = app.chain_abc().await;
    let mut b_on_first = app.subscribe(b.id, &b.token, None).await;
    let mut b_on_second = subscribe_at(&second, b.id, &b.token, None).await;
    let mut a_on_second = subscribe_at(&second, a.id, &a.token, None).await;
    let mut admin_on_second = subscribe_at(&second, Target::All, ADMIN, None).await;
    app.publish_purchases("multi", c.id, 5).await;
    assert_eq!(seqs(&b_on_first.earnings(5).await), vec![1, 2, 3, 4, 5]);
    assert_eq!(seqs(&b_on_second.earnings(5).await), vec![1, 2, 3, 4, 5]);
    let level_2 = a_on_second.earnings(5).await;
    assert!(level_2
        .iter()
        .all(|e| e.level.map(Level::get) == Some(2) && e.amount.to_string() == "20.00"));
    assert_eq!(admin_on_second.earnings(10).await.len(), 10);
    app.stop().await;
}

#[tokio::test]
async fn a_client_too_slow_to_keep_up_is_closed_without_slowing_the_others() {
    let app = TestApp::spawn_with(Services::default(), |s| {
        s.notifier.user_buffer = 256;
        s.notifier.socket_send_buffer = 8192;
        s.notifier.send_timeout_secs = 2;
    })
    .await;
    let (_, b, c) = app.chain_abc().await;
    // The slow client: a tiny receive buffer, and it stops reading after `subscribed`.
    let addr = app
        .ws_url
        .trim_start_matches("ws://")
        .trim_end_matches("/ws")
        .to_owned();
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .set_recv_buffer_size(4096)
        .expect("small receive buffer");
    let stream = socket
        .connect(addr.parse().expect("address"))
        .await
        .expect("connect");
    let (mut slow, _) = tokio_tungstenite::client_async(app.ws_url.as_str(), stream)
        .await
        .expect("handshake");
    let subscribe = Subscribe::new(b.id.target(), &b.token, Some(0));
    slow.send(Message::Text(subscribe.to_text().into()))
        .await
        .expect("subscribe");
    let mut fast = app.subscribe(b.id, &b.token, Some(0)).await;

    let total = 2500;
    let (_, fast_events) = tokio::join!(
        app.publish_purchases("slow", c.id, total),
        fast.earnings(total)
    );
    assert_eq!(
        seqs(&fast_events),
        (1..=total as i64).collect::<Vec<_>>(),
        "the fast client got everything in order"
    );

    // Now read what the slow client was sent: it must have been cut off with a reason.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut received = 0;
    let mut ending = None;
    while let Ok(Some(msg)) = tokio::time::timeout(Duration::from_secs(10), slow.next()).await {
        match msg {
            Ok(Message::Text(t)) => match server_message(&t) {
                ServerMessage::Earning { .. } => received += 1,
                ServerMessage::Error(e) => ending = Some(format!("error frame \"{}\"", e.code)),
                ServerMessage::Subscribed { .. } => {}
            },
            Ok(Message::Close(frame)) => {
                ending = Some(format!(
                    "close {:?}",
                    frame.map(|f| (f.code, f.reason.to_string()))
                ));
                break;
            }
            Ok(_) => {}
            Err(e) => {
                ending = Some(format!("connection dropped: {e}"));
                break;
            }
        }
    }
    assert!(
        received < total,
        "the slow client was not cut off ({received} events)"
    );
    let ending = ending.expect("the slow client's stream ended");
    assert!(
        ending.contains("lagged")
            || ending.contains("4001")
            || ending.contains("Library(4001)")
            || ending.contains("dropped"),
        "unexpected ending: {ending}"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_client_that_stops_answering_pings_is_closed() {
    let app = TestApp::spawn_with(Services::default(), |s| {
        s.notifier.ping_interval_secs = 1;
        s.notifier.idle_timeout_secs = 2;
    })
    .await;
    let (_, b, _) = app.chain_abc().await;
    let mut silent = app.subscribe(b.id, &b.token, None).await;
    // Not reading means not answering pings.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut close = None;
    while let Ok(Some(Ok(msg))) =
        tokio::time::timeout(Duration::from_secs(5), silent.0.next()).await
    {
        if let Message::Close(frame) = msg {
            close = frame;
            break;
        }
    }
    let close = close.expect("a close frame with a reason");
    assert_eq!(close.code, CloseCode::from(4002));
    assert!(close.reason.contains("ping"), "{}", close.reason);

    // A client that does read (and so answers pings) stays connected.
    let mut live = app.subscribe(b.id, &b.token, None).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(500), live.0.next()).await {
            Ok(Some(Ok(Message::Close(frame)))) => {
                panic!("a responsive client was closed: {frame:?}")
            }
            Ok(None) | Ok(Some(Err(_))) => panic!("a responsive client was dropped"),
            _ => {}
        }
    }
    app.stop().await;
}

#[tokio::test]
async fn after_broker_loss_the_notifier_reconnects_and_subscribers_miss_nothing() {
    let app = TestApp::spawn().await;
    let (_, b, c) = app.chain_abc().await;
    let mut ws = app.subscribe(b.id, &b.token, None).await;
    app.purchase("before-loss", c.id, "2000").await;
    assert_eq!(seqs(&ws.earnings(1).await), vec![1]);

    assert!(app.kill_broker_connections("upline-notifier").await >= 1);
    // Published while the notifier has no queue: recovered from PostgreSQL on reconnect.
    app.purchase("during-loss", c.id, "2000").await;
    app.wait_processed("during-loss").await;
    app.purchase("after-loss", c.id, "2000").await;
    let events = ws.earnings(2).await;
    assert_eq!(seqs(&events), vec![2, 3]);
    assert_eq!(events[0].purchase_id.as_deref(), Some("during-loss"));
    app.stop().await;
}

#[tokio::test]
async fn after_broker_loss_the_api_and_worker_reconnect_by_themselves() {
    let app = TestApp::spawn().await;
    let (_, b, c) = app.chain_abc().await;
    app.purchase("pre", c.id, "2000").await;
    app.wait_processed("pre").await;
    assert!(app.kill_broker_connections("upline-worker").await >= 1);
    assert!(app.kill_broker_connections("upline-api").await >= 1);
    // A client retries on 503, as Retry-After tells it to.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = app
            .post_purchase(json!({"purchase_id": "post", "buyer_id": c.id, "amount": "2000"}))
            .await;
        if r.status() == 202 {
            break;
        }
        assert_eq!(r.status(), 503);
        assert!(Instant::now() < deadline, "the api did not reconnect");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let report = app.wait_processed("post").await;
    assert_eq!(report["status"], "processed");
    assert_eq!(app.earnings(b.id).await["total"], "200.00");
    app.stop().await;
}
