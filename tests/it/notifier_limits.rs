//! The notifier's bounds (README "Live updates"): replay in pages whatever the history, connection
//! caps per user, per address and in all (released however a connection ends), sockets that do
//! not subscribe in time, and hub entries that go with their last subscriber.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use upline_common::events::EarningEvent;
use upline_common::protocol::{ErrorCode, ServerMessage, SseEvent, Target};
use upline_common::UserId;
use upline_notifier::feed::Feed;
use upline_notifier::hub::{Frame, Hub};

use crate::harness::{service_settings, Services, Sse, SubscribeTarget, TestApp, Ws, ADMIN};

fn seqs(events: &[EarningEvent]) -> Vec<i64> {
    events.iter().map(|e| e.seq).collect()
}

/// Writes `n` earnings of `earner` (seq after `from_seq`) straight into the ledger, as years of
/// purchases would have, and moves the user's `earnings_seq` on, so the pipeline continues
/// after them.
async fn insert_history(app: &TestApp, earner: i64, source: i64, from_seq: i64, n: i64) {
    let mut tx = app.db.begin().await.expect("begin");
    sqlx::query(
        "insert into purchases (purchase_id, status, buyer_id, amount, currency, fingerprint, body)
         select 'history-' || $1 || '-' || s, 'processed', $2, 2000, 'INR', 'history', '{}'::jsonb
         from generate_series($3::bigint + 1, $3::bigint + $4::bigint) s",
    )
    .bind(earner)
    .bind(source)
    .bind(from_seq)
    .bind(n)
    .execute(&mut *tx)
    .await
    .expect("history purchases");
    sqlx::query(
        r#"insert into earnings (earner_id, seq, source_user_id, purchase_id, level, rate, amount, currency, totals)
         select $1, s, $2, 'history-' || $1 || '-' || s, 1, 0.05, 100, 'INR',
                '{"total": "100.00", "level_1": "100.00", "level_2": "0.00"}'::jsonb
         from generate_series($3::bigint + 1, $3::bigint + $4::bigint) s"#,
    )
    .bind(earner)
    .bind(source)
    .bind(from_seq)
    .bind(n)
    .execute(&mut *tx)
    .await
    .expect("history earnings");
    sqlx::query("update earner_balances set earnings_seq = $2 where user_id = $1")
        .bind(earner)
        .bind(from_seq + n)
        .execute(&mut *tx)
        .await
        .expect("earnings_seq");
    tx.commit().await.expect("commit");
}

#[tokio::test]
async fn a_long_history_replays_in_small_pages_exactly_once_in_order_while_purchases_arrive() {
    // Pages of 64 and a hub buffer of 16: the live channel lags many times during the replay.
    let app = TestApp::spawn_with(Services::default(), |s| {
        s.notifier.replay_page_size = 64;
        s.notifier.user_buffer = 16;
    })
    .await;
    let (_, b, c) = app.chain_abc().await;
    let history = 3_000;
    insert_history(&app, b.id, c.id, 0, history).await;
    let live = 300;
    let total = history as usize + live;

    let mut from_start = app.subscribe(b.id, &b.token, Some(0)).await;
    let mut from_middle = app.subscribe(b.id, &b.token, Some(1_234)).await;
    let (_, all, rest) = tokio::join!(
        app.publish_purchases("during-replay", c.id, live),
        from_start.earnings(total),
        from_middle.earnings(total - 1_234),
    );
    assert_eq!(seqs(&all), (1..=total as i64).collect::<Vec<_>>());
    assert_eq!(seqs(&rest), (1_235..=total as i64).collect::<Vec<_>>());
    let live_ones: Vec<_> = all[history as usize..]
        .iter()
        .map(|e| e.purchase_id.clone())
        .collect();
    assert!(
        live_ones.iter().all(|p| p
            .as_deref()
            .is_some_and(|p| p.starts_with("during-replay-"))),
        "the live purchases follow the history"
    );
    // Still live after the replay: the next purchase arrives on both.
    app.purchase("after-replay", c.id, "2000.00").await;
    assert_eq!(seqs(&from_start.earnings(1).await), vec![total as i64 + 1]);
    assert_eq!(seqs(&from_middle.earnings(1).await), vec![total as i64 + 1]);
    app.stop().await;
}

#[tokio::test]
async fn a_feed_never_holds_more_than_one_page_and_fills_gaps_and_lags_from_the_database() {
    let app = TestApp::spawn().await;
    let (_, b, c) = app.chain_abc().await;
    insert_history(&app, b.id, c.id, 0, 3_000).await;
    // A hub of its own, with room for 4 frames, fed by hand.
    let hub = Arc::new(Hub::new(4, 4));
    let page = 50;
    let mut feed = Feed::open(
        &hub,
        app.db.clone(),
        Target::User(UserId::new(b.id).expect("positive")),
        Some(0),
        None,
        page,
    )
    .await
    .expect("feed opens");
    let earner = UserId::new(b.id).expect("positive");
    let frame = |seq: i64| {
        let event = serde_json::value::to_raw_value(&serde_json::json!({ "seq": seq }))
            .expect("serialises");
        Frame::from_json(earner, seq, seq, event)
    };
    let mut got = Vec::new();
    while got.len() < 3_000 {
        got.push(next(&mut feed).await);
        // Live frames keep coming during the replay, far more than the hub holds: the feed
        // lags, and must neither end nor skip nor repeat anything.
        if got.len() % 7 == 0 {
            hub.publish(frame(got.len() as i64));
        }
        assert!(
            feed.max_pending() <= page,
            "{} frames pending",
            feed.max_pending()
        );
    }
    assert_eq!(got, (1..=3_000).collect::<Vec<_>>());
    // 3,000 is 60 full pages: the feed learns the replay is over from the next, empty, page.

    // Live: 10 more committed, but only the last one published (the others' relays are late):
    // the feed reads the gap from the database, in order.
    insert_history(&app, b.id, c.id, 3_000, 10).await;
    hub.publish(frame(3_010));
    let mut live = Vec::new();
    while live.len() < 10 {
        live.push(next(&mut feed).await);
    }
    assert_eq!(live, (3_001..=3_010).collect::<Vec<_>>());
    // The late ones arrive: already sent, dropped. Then the next one is delivered as is.
    // (More than the hub holds, so the feed lags, and reads 3,011 from the database, where it
    // is committed before it is published.)
    insert_history(&app, b.id, c.id, 3_010, 1).await;
    for seq in 3_001..=3_009 {
        hub.publish(frame(seq));
    }
    hub.publish(frame(3_011));
    assert_eq!(next(&mut feed).await, 3_011);
    assert!(feed.max_pending() <= page);
    assert_eq!(feed.last_seq(), 3_011);
    drop(feed);
    assert_eq!(hub.subscribed_users(), 0);
    app.stop().await;
}

/// The `seq` of the feed's next frame, waiting up to 10 s.
async fn next(feed: &mut Feed) -> i64 {
    tokio::time::timeout(Duration::from_secs(10), feed.next())
        .await
        .expect("a frame within 10 s")
        .expect("a frame")
        .seq
}

/// How the server ended a WebSocket: the messages it sent first, and the close code and
/// reason.
type Refusal = (Vec<ServerMessage>, Option<(u16, String)>);

/// A WebSocket that subscribed to `user_id`, or how the server refused it: the messages it
/// sent, and the close code and reason.
async fn try_subscribe(
    request: impl IntoClientRequest + Unpin,
    user_id: impl SubscribeTarget,
    token: &str,
) -> Result<Ws, Refusal> {
    let subscribe = upline_common::protocol::Subscribe::new(user_id.target(), token, None);
    try_subscribe_with(request, subscribe.to_text()).await
}

/// [`try_subscribe`] with `message` as the subscribe message.
async fn try_subscribe_with(
    request: impl IntoClientRequest + Unpin,
    message: String,
) -> Result<Ws, Refusal> {
    let (ws, _) = tokio_tungstenite::connect_async(request)
        .await
        .expect("websocket connects");
    let mut ws = Ws(ws);
    // A refused connection may be closed before this arrives.
    let _ = ws.send_text(message).await;
    let (frames, close) = loop {
        match tokio::time::timeout(Duration::from_secs(15), ws.0.next())
            .await
            .expect("an answer within 15 s")
        {
            Some(Ok(Message::Text(t))) => {
                let v = crate::harness::server_message(&t);
                if matches!(v, ServerMessage::Subscribed { .. }) {
                    return Ok(ws);
                }
                let (mut rest, close) = ws.until_close().await;
                rest.insert(0, v);
                break (rest, close);
            }
            Some(Ok(Message::Close(c))) => {
                break (
                    Vec::new(),
                    c.map(|c| (u16::from(c.code), c.reason.to_string())),
                )
            }
            Some(Ok(_)) => {}
            None | Some(Err(_)) => break (Vec::new(), None),
        }
    };
    Err((frames, close))
}

/// Asserts a refusal: one error frame with `code`, then close code `close`.
fn assert_refused(outcome: Result<Ws, Refusal>, code: ErrorCode, close: u16) {
    let Err((frames, closed)) = outcome else {
        panic!("subscribed, but {code} was expected");
    };
    assert_eq!(frames.len(), 1, "{frames:?}");
    let ServerMessage::Error(error) = &frames[0] else {
        panic!("an error frame was expected: {frames:?}");
    };
    assert_eq!(error.code, code, "{frames:?}");
    assert!(error.retry_after.is_some_and(|s| s >= 1));
    assert_eq!(closed.map(|c| c.0), Some(close), "{frames:?}");
}

/// Retries `attempt` (closing what it opened when it fails) until it succeeds: slots are
/// released when the server notices a connection ended, a moment after the client left.
async fn eventually<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    mut attempt: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(t) = attempt().await {
            return t;
        }
        assert!(Instant::now() < deadline, "{what} within 10 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn close(mut ws: Ws) {
    let _ = ws.0.close(None).await;
}

/// Asserts that `GET /events/{user_id}` is refused with `status`, `Retry-After: 10` and a
/// problem+json of `code`.
async fn assert_sse_refused(app: &TestApp, user_id: i64, token: &str, status: u16, code: &str) {
    let r = app
        .http
        .get(format!("{}/events/{user_id}", app.notifier))
        .bearer_auth(token)
        .send()
        .await
        .expect("request");
    assert_eq!(r.status().as_u16(), status);
    assert_eq!(
        r.headers().get("retry-after").and_then(|v| v.to_str().ok()),
        Some("10")
    );
    assert_eq!(
        r.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/problem+json")
    );
    let body: Value = r.json().await.expect("problem+json");
    assert_eq!(body["code"], code, "{body}");
}

#[tokio::test]
async fn a_user_with_too_many_streams_is_refused_on_websocket_and_sse_until_one_closes() {
    let app = TestApp::spawn_with(Services::default(), |s| {
        s.limits.enabled = true;
        s.notifier.max_connections_per_user = 2;
    })
    .await;
    let (a, b, c) = app.chain_abc().await;
    let ws = app.subscribe(b.id, &b.token, None).await;
    let (status, sse) = Sse::open(&app, b.id, &b.token, false).await;
    assert_eq!(status, 200);
    // A third stream of B's, either way, is refused with its own code.
    assert_refused(
        try_subscribe(app.ws_url.as_str(), b.id, &b.token).await,
        ErrorCode::TooManyConnectionsForUser,
        4004,
    );
    assert_sse_refused(&app, b.id, &b.token, 429, "too_many_connections_for_user").await;
    // Another user is unaffected, and so is the admin feed of everyone.
    let mut a_ws = app.subscribe(a.id, &a.token, None).await;
    let _admin = app.subscribe(Target::All, ADMIN, None).await;

    // Closing one of B's streams frees its slot.
    close(ws).await;
    let mut again = eventually("a WebSocket slot for B again", || async {
        try_subscribe(app.ws_url.as_str(), b.id, &b.token)
            .await
            .ok()
    })
    .await;
    drop(sse);
    let (status, mut sse) = eventually("an SSE slot for B again", || async {
        let (status, sse) = Sse::open(&app, b.id, &b.token, false).await;
        (status == 200).then_some((status, sse))
    })
    .await;
    assert_eq!(status, 200);
    app.purchase("capped-user", c.id, "2000.00").await;
    assert_eq!(seqs(&again.earnings(1).await), vec![1]);
    assert_eq!(
        sse.until_event::<EarningEvent>(SseEvent::Earning)
            .await
            .expect("an earning")
            .seq,
        1
    );
    assert_eq!(seqs(&a_ws.earnings(1).await), vec![1]);
    app.stop().await;
}

/// A WebSocket request from `forwarded_for` (through a trusted proxy).
fn from_address(url: &str, forwarded_for: &'static str) -> impl IntoClientRequest + Unpin {
    let mut request = url.into_client_request().expect("request");
    request
        .headers_mut()
        .insert("x-forwarded-for", HeaderValue::from_static(forwarded_for));
    request
}

#[tokio::test]
async fn an_address_with_too_many_connections_is_refused_subscribed_or_not() {
    let app = TestApp::spawn_with(Services::default(), |s| {
        s.limits.enabled = true;
        s.limits.trust_forwarded_for = true;
        s.notifier.max_connections_per_address = 3;
        s.notifier.subscribe_timeout_secs = 60;
    })
    .await;
    let (_, b, _) = app.chain_abc().await;
    let proxy = "198.51.100.7";
    // Three sockets that never subscribe hold the address's three slots.
    let mut idle = Vec::new();
    for _ in 0..3 {
        let (ws, _) = tokio_tungstenite::connect_async(from_address(&app.ws_url, proxy))
            .await
            .expect("connects");
        idle.push(ws);
    }
    assert_refused(
        try_subscribe(from_address(&app.ws_url, proxy), b.id, &b.token).await,
        ErrorCode::TooManyConnectionsFromAddress,
        4005,
    );
    let refused = app
        .http
        .get(format!("{}/events/{}", app.notifier, b.id))
        .bearer_auth(&b.token)
        .header("x-forwarded-for", proxy)
        .send()
        .await
        .expect("request");
    assert_eq!(refused.status(), 429);
    assert_eq!(
        refused
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("10")
    );
    assert_eq!(
        refused.json::<Value>().await.expect("problem")["code"],
        "too_many_connections_from_address"
    );
    // Other addresses (here the direct peer, 127.0.0.1) are unaffected.
    let other = app.subscribe(b.id, &b.token, None).await;
    // One idle socket goes: its slot is free again.
    drop(idle.pop());
    let back = eventually("a slot for the address again", || async {
        try_subscribe(from_address(&app.ws_url, proxy), b.id, &b.token)
            .await
            .ok()
    })
    .await;
    close(back).await;
    close(other).await;
    app.stop().await;
}

#[tokio::test]
async fn with_abuse_limits_off_only_the_total_cap_holds() {
    let app = TestApp::spawn_with(Services::default(), |s| {
        // Tests run with limits.enabled = false: the per-user and per-address caps are off.
        s.notifier.max_connections = 3;
        s.notifier.max_connections_per_user = 1;
        s.notifier.max_connections_per_address = 1;
    })
    .await;
    let (_, b, _) = app.chain_abc().await;
    let first = app.subscribe(b.id, &b.token, None).await;
    let _second = app.subscribe(b.id, &b.token, None).await;
    let (status, _sse) = Sse::open(&app, b.id, &b.token, false).await;
    assert_eq!(status, 200, "three of one user from one address");
    assert_refused(
        try_subscribe(app.ws_url.as_str(), b.id, &b.token).await,
        ErrorCode::NotifierFull,
        1013,
    );
    assert_sse_refused(&app, b.id, &b.token, 503, "notifier_full").await;
    close(first).await;
    let again = eventually("a slot once one closed", || async {
        try_subscribe(app.ws_url.as_str(), b.id, &b.token)
            .await
            .ok()
    })
    .await;
    close(again).await;
    app.stop().await;
}

#[tokio::test]
async fn slots_are_released_however_a_connection_ends() {
    let app = TestApp::spawn_with(Services::default(), |s| {
        s.limits.enabled = true;
        s.limits.auth_failures_per_minute = 100;
        s.notifier.max_connections = 2;
        s.notifier.max_connections_per_user = 1;
        s.notifier.max_connections_per_address = 2;
        s.notifier.subscribe_timeout_secs = 1;
    })
    .await;
    let (a, b, _) = app.chain_abc().await;
    // Each of these ends one way; each, if its slots leaked, would leave fewer than two.
    // 1. The client closes.
    close(app.subscribe(b.id, &b.token, Some(0)).await).await;
    // 2. The client's TCP connection drops without a close frame.
    drop(app.subscribe(b.id, &b.token, None).await);
    // 3. A malformed subscribe message; 4. a token that is not valid.
    let malformed = json!({"type": "subscribe", "user_id": "seven", "token": "x"});
    assert!(
        try_subscribe_with(app.ws_url.as_str(), malformed.to_string())
            .await
            .is_err()
    );
    assert!(try_subscribe(app.ws_url.as_str(), b.id, "nonsense")
        .await
        .is_err());
    // 5. No subscribe message in time.
    let (ws, _) = tokio_tungstenite::connect_async(app.ws_url.as_str())
        .await
        .expect("connects");
    let (_, closed) = Ws(ws).until_close().await;
    assert_eq!(closed.map(|c| c.0), Some(4006));
    // 6. An SSE stream the client drops; 7. an SSE request refused.
    let (status, sse) = Sse::open(&app, b.id, &b.token, false).await;
    assert_eq!(status, 200);
    drop(sse);
    let (status, _) = Sse::open(&app, b.id, "nonsense", false).await;
    assert_eq!(status, 403);
    // 8. The server ends the stream: the user signs out everywhere (4003).
    let mut revoked = app.subscribe(a.id, &a.token, None).await;
    let r = app
        .http
        .delete(app.url(&format!("/api/users/{}/tokens", a.id)))
        .bearer_auth(&a.token)
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 204);
    let (_, closed) = revoked.until_close().await;
    assert_eq!(closed.map(|c| c.0), Some(4003));

    // Both slots are free again, and B's one stream slot too.
    let (one, two) = eventually("two connections at once", || async {
        let one = try_subscribe(app.ws_url.as_str(), b.id, &b.token).await;
        let two = try_subscribe(app.ws_url.as_str(), Target::All, ADMIN).await;
        match (one, two) {
            (Ok(one), Ok(two)) => Some((one, two)),
            (one, two) => {
                for ws in [one.ok(), two.ok()].into_iter().flatten() {
                    close(ws).await;
                }
                None
            }
        }
    })
    .await;
    close(one).await;
    close(two).await;
    app.stop().await;
}

#[tokio::test]
async fn a_socket_that_does_not_subscribe_in_time_is_closed_with_a_reason() {
    let app = TestApp::spawn_with(Services::default(), |s| {
        s.notifier.subscribe_timeout_secs = 1;
    })
    .await;
    let (_, b, c) = app.chain_abc().await;
    let started = Instant::now();
    let (ws, _) = tokio_tungstenite::connect_async(app.ws_url.as_str())
        .await
        .expect("connects");
    let (frames, closed) = Ws(ws).until_close().await;
    let waited = started.elapsed();
    assert_eq!(frames.len(), 1, "{frames:?}");
    assert!(
        matches!(&frames[0], ServerMessage::Error(e) if e.code == ErrorCode::SubscribeTimeout),
        "{frames:?}"
    );
    let (code, reason) = closed.expect("a close frame");
    assert_eq!(code, 4006);
    assert!(reason.contains("subscribe"), "{reason}");
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "closed after {waited:?}"
    );
    // One that subscribed in time stays open past the timeout.
    let mut ws = app.subscribe(b.id, &b.token, None).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    app.purchase("after-the-timeout", c.id, "2000.00").await;
    assert_eq!(seqs(&ws.earnings(1).await), vec![1]);
    app.stop().await;
}

#[tokio::test]
async fn a_users_hub_entry_goes_when_its_last_client_disconnects() {
    let app = TestApp::spawn().await;
    let (a, b, c) = app.chain_abc().await;
    // A notifier whose hub the test can see.
    let hub = Arc::new(Hub::new(64, 64));
    let stop = CancellationToken::new();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let ws_url = format!("{}/ws", base.replace("http://", "ws://"));
    let task = tokio::spawn(upline_notifier::serve(
        service_settings(&app.settings, "notifier"),
        listener,
        stop.clone(),
        hub.clone(),
    ));
    eventually("the notifier ready", || async {
        let r = app.http.get(format!("{base}/readyz")).send().await.ok()?;
        r.status().is_success().then_some(())
    })
    .await;
    let before = hub.subscribed_users();
    assert_eq!(before, 0);

    let first = crate::harness::subscribe_at(&ws_url, b.id, &b.token, None).await;
    let mut second = crate::harness::subscribe_at(&ws_url, b.id, &b.token, Some(0)).await;
    let admin = crate::harness::subscribe_at(&ws_url, Target::All, ADMIN, None).await;
    let sse = app
        .http
        .get(format!("{base}/events/{}", a.id))
        .bearer_auth(&a.token)
        .send()
        .await
        .expect("SSE");
    assert_eq!(sse.status(), 200);
    assert_eq!(hub.subscribed_users(), before + 2, "B and A");
    app.purchase("hub-entries", c.id, "2000.00").await;
    assert_eq!(seqs(&second.earnings(1).await), vec![1]);

    let wait_for = |n: usize, what: &'static str| {
        let hub = hub.clone();
        async move {
            eventually(what, || {
                let hub = hub.clone();
                async move { (hub.subscribed_users() == n).then_some(()) }
            })
            .await
        }
    };
    close(first).await;
    close(admin).await;
    // B still has a subscriber: the entry stays, and still delivers.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(hub.subscribed_users(), before + 2);
    app.purchase("hub-entries-2", c.id, "2000.00").await;
    assert_eq!(seqs(&second.earnings(1).await), vec![2]);
    close(second).await;
    wait_for(before + 1, "B's entry removed").await;
    drop(sse);
    wait_for(before, "A's entry removed").await;

    stop.cancel();
    task.await
        .expect("notifier task")
        .expect("notifier stopped cleanly");
    app.stop().await;
}
