//! Safe to deploy (README "Security"): secure defaults, expiring and revocable tokens, keys
//! only in headers, abuse limits, protection of referral slots, erasure and the leaderboard
//! opt-out, retention of raw message bodies — each against the real services.

use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::process::Command;
use upline_common::protocol::{ErrorCode, ErrorMessage, ServerMessage, SseEvent};

use crate::harness::{Services, Sse, TestApp, ADMIN, PRODUCER};

/// A request's status and JSON body.
async fn call(request: reqwest::RequestBuilder) -> (u16, Value) {
    let r = request.send().await.expect("request");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Runs `upline <args>` with only `env` set (no `UPLINE__…` from the test's own environment);
/// returns whether it succeeded and what it printed. It must exit within 20 s.
async fn upline_exits(args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_upline"));
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .current_dir(std::env::temp_dir())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(20), cmd.output())
        .await
        .expect("it exits instead of running")
        .expect("the upline binary runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test]
async fn a_deployment_with_nothing_configured_refuses_to_start_and_names_the_setting() {
    // Nothing set at all: production by default, and no secret.
    let (ok, out) = upline_exits(&["run"], &[]).await;
    assert!(!ok, "started without secrets:\n{out}");
    assert!(
        out.contains("auth.token_secret is not set") && out.contains("UPLINE__AUTH__TOKEN_SECRET"),
        "{out}"
    );
    // The development admin key, in production.
    let secret = "a-real-token-secret-of-at-least-32-characters";
    let (ok, out) = upline_exits(
        &["api"],
        &[
            ("UPLINE__AUTH__TOKEN_SECRET", secret),
            ("UPLINE__AUTH__ADMIN_TOKEN", "dev-admin-token"),
            (
                "UPLINE__AUTH__PRODUCER_TOKEN",
                "a-real-producer-key-of-at-least-32-characters",
            ),
        ],
    )
    .await;
    assert!(!ok, "started with the development admin key:\n{out}");
    assert!(
        out.contains("auth.admin_token is a built-in development value"),
        "{out}"
    );
    // The same key for admin and producer.
    let (ok, out) = upline_exits(
        &["worker"],
        &[
            ("UPLINE__AUTH__TOKEN_SECRET", secret),
            (
                "UPLINE__AUTH__ADMIN_TOKEN",
                "one-key-for-everything-0123456789abcdef",
            ),
            (
                "UPLINE__AUTH__PRODUCER_TOKEN",
                "one-key-for-everything-0123456789abcdef",
            ),
        ],
    )
    .await;
    assert!(!ok, "started with one key for two roles:\n{out}");
    assert!(
        out.contains("auth.admin_token and auth.producer_token must differ"),
        "{out}"
    );
}

#[tokio::test]
async fn user_tokens_expire_and_are_renewed_before_they_do() {
    let app = TestApp::spawn_with(Services::default(), |s| {
        s.auth.token_ttl = Duration::from_secs(6);
    })
    .await;
    let (a, _, _) = app.chain_abc().await;
    let issue = |token: String| {
        call(
            app.http
                .post(app.url(&format!("/api/users/{}/token", a.id)))
                .bearer_auth(token),
        )
    };
    // A fresh token, so that the steps below run well within its lifetime.
    let (status, first) = issue(ADMIN.to_owned()).await;
    assert_eq!(status, 200, "{first}");
    let token = first["token"].as_str().expect("token").to_owned();
    let me = |token: String| call(app.http.get(app.url("/api/me")).bearer_auth(token));
    assert_eq!(me(token.clone()).await.0, 200);
    let mut ws = app.subscribe(a.id, &token, Some(0)).await;

    // Renewed by the user itself, while the token is valid: a new token that lives longer.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, renewed) = issue(token.clone()).await;
    assert_eq!(status, 200, "{renewed}");
    let expiry = |v: &Value| {
        time::OffsetDateTime::parse(
            v["expires_at"].as_str().expect("expires_at"),
            &time::format_description::well_known::Rfc3339,
        )
        .expect("RFC 3339")
    };
    assert!(expiry(&renewed) > expiry(&first), "{renewed} vs {first}");
    let renewed = renewed["token"].as_str().expect("token").to_owned();
    assert_eq!(me(renewed).await.0, 200);

    // The socket opened with the first token closes when it expires.
    let (frames, close) = ws.until_close().await;
    assert_eq!(
        close.map(|c| c.0),
        Some(4003),
        "closed with 4003 at expiry: {frames:?}"
    );
    assert_eq!(
        frames.last().map(error_code),
        Some(Some(ErrorCode::TokenExpired))
    );
    let (status, body) = me(token.clone()).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (403, Some("token_expired"))
    );
    // An expired token cannot renew itself; the admin can issue a new one.
    assert_eq!(issue(token).await.0, 403);
    let (status, issued) = issue(ADMIN.to_owned()).await;
    assert_eq!(status, 200);
    assert_eq!(
        me(issued["token"].as_str().expect("token").to_owned())
            .await
            .0,
        200
    );
    app.stop().await;
}

#[tokio::test]
async fn revoking_or_deactivating_a_user_refuses_its_tokens_and_closes_its_streams_at_once() {
    let app = TestApp::spawn().await;
    let (a, b, c) = app.chain_abc().await;
    let earnings_of = |id: i64, token: String| {
        call(
            app.http
                .get(app.url(&format!("/api/users/{id}/earnings")))
                .bearer_auth(token),
        )
    };
    assert_eq!(earnings_of(b.id, b.token.clone()).await.0, 200);
    let mut ws = app.subscribe(b.id, &b.token, Some(0)).await;
    let (status, mut sse) = Sse::open(&app, b.id, &b.token, true).await;
    assert_eq!(status, 200);
    // A stream the admin opened on B is not B's to lose.
    let mut admin_ws = app.subscribe(b.id, ADMIN, Some(0)).await;

    // B signs out everywhere.
    let (status, _) = call(
        app.http
            .delete(app.url(&format!("/api/users/{}/tokens", b.id)))
            .bearer_auth(&b.token),
    )
    .await;
    assert_eq!(status, 204);
    let (frames, close) = ws.until_close().await;
    assert_eq!(close.map(|c| c.0), Some(4003), "{frames:?}");
    assert_eq!(
        frames.last().map(error_code),
        Some(Some(ErrorCode::TokenRevoked))
    );
    let ended: ErrorMessage = sse
        .until_event(SseEvent::FeedError)
        .await
        .expect("a feed-error event");
    assert_eq!(ended.code, ErrorCode::TokenRevoked);
    let (status, body) = earnings_of(b.id, b.token.clone()).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (403, Some("token_revoked"))
    );
    let (status, body) = Sse::open(&app, b.id, &b.token, false).await;
    assert_eq!(status, 403);
    assert_eq!(body.problem().await["code"], "token_revoked");
    // Other users' tokens are unaffected, and the admin's stream goes on.
    assert_eq!(earnings_of(a.id, a.token.clone()).await.0, 200);
    app.purchase("after-revoke", c.id, "2000.00").await;
    assert_eq!(admin_ws.earnings(1).await[0].earner_id.get(), b.id);

    // A new token from the admin works; deactivation revokes it in turn.
    let (_, issued) = call(
        app.http
            .post(app.url(&format!("/api/users/{}/token", b.id)))
            .bearer_auth(ADMIN),
    )
    .await;
    let fresh = issued["token"].as_str().expect("token").to_owned();
    assert_eq!(earnings_of(b.id, fresh.clone()).await.0, 200);
    let mut ws = app.subscribe(b.id, &fresh, None).await;
    let (status, _) = call(
        app.http
            .post(app.url(&format!("/api/users/{}/deactivate", b.id)))
            .bearer_auth(ADMIN),
    )
    .await;
    assert_eq!(status, 200);
    let (_, close) = ws.until_close().await;
    assert_eq!(close.map(|c| c.0), Some(4003));
    assert_eq!(earnings_of(b.id, fresh).await.0, 403);
    let (status, body) = call(
        app.http
            .post(app.url(&format!("/api/users/{}/token", b.id)))
            .bearer_auth(ADMIN),
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (409, Some("user_inactive"))
    );
    app.stop().await;
}

#[tokio::test]
async fn only_user_tokens_may_travel_in_a_url() {
    let app = TestApp::spawn().await;
    let (_, b, _) = app.chain_abc().await;
    let (status, sse) = Sse::open(&app, b.id, ADMIN, true).await;
    assert_eq!(status, 403);
    assert_eq!(sse.problem().await["code"], "key_in_url");
    let (status, _) = Sse::open(&app, b.id, ADMIN, false).await;
    assert_eq!(status, 200, "the admin key in the Authorization header");
    let (status, _) = Sse::open(&app, b.id, &b.token, true).await;
    assert_eq!(status, 200, "a user token in the URL");
    let (status, _) = Sse::open(&app, b.id, PRODUCER, false).await;
    assert_eq!(status, 403, "the producer key opens no feed");
    // Keys are compared whole: a prefix of the admin key is no key.
    let (status, _) = call(
        app.http
            .get(app.url("/api/users"))
            .bearer_auth(&ADMIN[..ADMIN.len() - 1]),
    )
    .await;
    assert_eq!(status, 403);
    app.stop().await;
}

#[tokio::test]
async fn sign_ups_and_failed_authentications_are_rate_limited_per_client_address() {
    let app = TestApp::spawn_with(Services::default(), |s| {
        s.limits.enabled = true;
        s.limits.registrations_per_minute = 3;
        s.limits.auth_failures_per_minute = 3;
        s.limits.trust_forwarded_for = true;
    })
    .await;
    let sign_up = |i: usize, from: &'static str| {
        call(
            app.http
                .post(app.url("/api/users"))
                .header("x-forwarded-for", from)
                .json(&json!({"name": format!("Bot {i}"), "email": format!("bot{i}@example.com")})),
        )
    };
    for i in 0..3 {
        assert_eq!(sign_up(i, "203.0.113.1").await.0, 201);
    }
    let r = app
        .http
        .post(app.url("/api/users"))
        .header("x-forwarded-for", "203.0.113.1")
        .json(&json!({"name": "Bot 3", "email": "bot3@example.com"}))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 429);
    let retry_after: u64 = r.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    assert_eq!(
        r.json::<Value>().await.expect("json")["code"],
        "rate_limited"
    );
    assert_eq!(sign_up(4, "203.0.113.2").await.0, 201, "another address");
    // The admin key is not limited.
    let (status, _) = call(
        app.http
            .post(app.url("/api/users"))
            .header("x-forwarded-for", "203.0.113.1")
            .bearer_auth(ADMIN)
            .json(&json!({"name": "Staff", "email": "staff@example.com"})),
    )
    .await;
    assert_eq!(status, 201);

    // Failed authentications: the three of the budget, and the one that overdraws it, are
    // answered 403; then everything from that address waits.
    let (status, user) = sign_up(5, "203.0.113.3").await;
    assert_eq!(status, 201);
    let token = user["token"].as_str().expect("token").to_owned();
    let me = |token: String, from: &'static str| {
        call(
            app.http
                .get(app.url("/api/me"))
                .header("x-forwarded-for", from)
                .bearer_auth(token),
        )
    };
    for _ in 0..4 {
        assert_eq!(me("guessed-key".into(), "198.51.100.9").await.0, 403);
    }
    let (status, body) = me("guessed-key".into(), "198.51.100.9").await;
    assert_eq!((status, body["code"].as_str()), (429, Some("rate_limited")));
    let (status, _) = me(token.clone(), "198.51.100.9").await;
    assert_eq!(status, 429, "even a good token waits: guessing stays slow");
    assert_eq!(me(token, "198.51.100.10").await.0, 200, "another address");

    // The notifier counts its own failures the same way.
    let sse = |token: &'static str| {
        app.http
            .get(format!("{}/events/{}", app.notifier, user["id"]))
            .header("x-forwarded-for", "198.51.100.20")
            .bearer_auth(token)
            .send()
    };
    for _ in 0..4 {
        assert_eq!(sse("guessed-key").await.expect("request").status(), 403);
    }
    let r = sse("guessed-key").await.expect("request");
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(
        r.json::<Value>().await.expect("json")["code"],
        "rate_limited"
    );
    app.stop().await;
}

#[tokio::test]
async fn eight_scripted_sign_ups_cannot_lock_a_referrer_out() {
    let app = TestApp::spawn().await;
    let ravi = app.register("Ravi", None).await;
    let anonymous = |body: Value| call(app.http.post(app.url("/api/users")).json(&body));

    // A stranger cannot name a referrer by id, and learns nothing about which ids exist.
    for id in [ravi.id, 999_999] {
        let (status, body) = anonymous(
            json!({"name": "Squatter", "email": format!("s{id}@example.com"), "referrer_id": id}),
        )
        .await;
        assert_eq!(
            (status, body["code"].as_str(), body["field"].as_str()),
            (403, Some("admin_only"), Some("referrer_id"))
        );
    }
    // Someone who has Ravi's code (it is shared publicly) scripts eight sign-ups.
    let mut squatters = Vec::new();
    for i in 0..8 {
        let (status, body) = anonymous(json!({"name": format!("Squatter {i}"), "email": format!("squat{i}@example.com"), "referral_code": ravi.referral_code})).await;
        assert_eq!(status, 201);
        squatters.push(body["id"].as_i64().expect("id"));
    }
    let friend = json!({"name": "Friend", "email": "friend@example.com", "referral_code": ravi.referral_code});
    let (status, body) = anonymous(friend.clone()).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (409, Some("referral_limit_reached"))
    );

    // Ravi releases them, since they never brought him anything.
    for id in &squatters {
        let (status, body) = call(
            app.http
                .delete(app.url(&format!("/api/users/{}/referrals/{id}", ravi.id)))
                .bearer_auth(&ravi.token),
        )
        .await;
        assert_eq!(status, 204, "{body}");
    }
    let (status, body) = anonymous(friend).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["referrer_id"].as_i64(), Some(ravi.id));
    let released: Option<i64> = sqlx::query_scalar("select referrer_id from users where id = $1")
        .bind(squatters[0])
        .fetch_one(&app.db)
        .await
        .expect("query");
    assert_eq!(released, None);

    // A referral that has paid Ravi is his to keep; only the admin may release it.
    let friend_id = body["id"].as_i64().expect("id");
    app.purchase("friend-buys", friend_id, "2000.00").await;
    app.wait_processed("friend-buys").await;
    let release = |token: &str| {
        call(
            app.http
                .delete(app.url(&format!("/api/users/{}/referrals/{friend_id}", ravi.id)))
                .bearer_auth(token.to_owned()),
        )
    };
    let (status, body) = release(&ravi.token).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (409, Some("referral_not_releasable"))
    );
    assert_eq!(release(ADMIN).await.0, 204);
    // Another user cannot release Ravi's referrals.
    let (status, _) = release(&app.register("Other", None).await.token).await;
    assert_eq!(status, 403);
    app.stop().await;
}

#[tokio::test]
async fn erasing_a_user_removes_its_personal_data_and_keeps_the_ledger_exact() {
    let app = TestApp::spawn().await;
    let (a, b, c) = app.chain_abc().await;
    let email: String = sqlx::query_scalar("select email from users where id = $1")
        .bind(b.id)
        .fetch_one(&app.db)
        .await
        .expect("email");
    app.purchase("before-erasure", b.id, "3000.00").await; // pays A 150.00 at level 1
    app.purchase("by-c-before", c.id, "2000.00").await; // B 100.00, A 20.00
    app.wait_processed("before-erasure").await;
    app.wait_processed("by-c-before").await;
    let mut ws = app.subscribe(b.id, &b.token, None).await;

    // B erases itself.
    let (status, _) = call(
        app.http
            .delete(app.url(&format!("/api/users/{}", b.id)))
            .bearer_auth(&b.token),
    )
    .await;
    assert_eq!(status, 204);
    let (_, close) = ws.until_close().await;
    assert_eq!(close.map(|c| c.0), Some(4003));
    let (status, user) = app.admin_get(&format!("/api/users/{}", b.id)).await;
    assert_eq!(status, 200);
    assert_eq!(user["name"], "erased user");
    assert_eq!(user["email"], Value::Null);
    assert_eq!(user["referral_code"], Value::Null);
    assert_eq!(user["is_active"], false);
    assert!(user["erased_at"].is_string());
    let leftovers: i64 = sqlx::query_scalar(
        "select count(*) from users where lower(email) = lower($1) or name = 'Bala'",
    )
    .bind(&email)
    .fetch_one(&app.db)
    .await
    .expect("count");
    assert_eq!(leftovers, 0, "nothing of B's personal data is left");
    let (status, body) = call(app.http.get(app.url("/api/me")).bearer_auth(&b.token)).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (403, Some("token_revoked"))
    );
    let (status, body) = call(
        app.http
            .post(app.url(&format!("/api/users/{}/reactivate", b.id)))
            .bearer_auth(ADMIN),
    )
    .await;
    assert_eq!((status, body["code"].as_str()), (409, Some("user_erased")));

    // The ledger stays exact: B's earnings remain; A's report names B anonymously.
    assert_eq!(app.earnings(b.id).await["total"], "100.00");
    let report = app.earnings(a.id).await;
    assert_eq!(report["total"], "170.00");
    let from_b = report["by_referral"]
        .as_array()
        .expect("by_referral")
        .iter()
        .find(|r| r["source_user_id"] == b.id)
        .expect("B's leg")
        .clone();
    assert_eq!(from_b["name"], "erased user");
    assert_eq!(from_b["total"], "150.00");
    // Later purchases below B skip it (inactive) and still pay A by position.
    app.purchase("by-c-after", c.id, "2000.00").await;
    let after = app.wait_processed("by-c-after").await;
    assert_eq!(after["levels"][0]["outcome"], "inactive");
    assert_eq!(after["levels"][1]["outcome"], "paid");
    assert_eq!(app.earnings(a.id).await["total"], "190.00");
    // Nobody can sign up with B's old code any more.
    let (_, board) = call(app.http.get(app.url("/api/leaderboard"))).await;
    assert!(
        board
            .as_array()
            .expect("leaderboard")
            .iter()
            .all(|l| l["user_id"] != b.id),
        "{board}"
    );
    let (status, _) = call(app.http.post(app.url("/api/users")).json(
        &json!({"name": "Late", "email": "late@example.com", "referral_code": b.referral_code}),
    ))
    .await;
    assert_eq!(status, 404);
    app.stop().await;
}

#[tokio::test]
async fn a_user_can_hide_from_the_leaderboard() {
    let app = TestApp::spawn().await;
    let (a, _, c) = app.chain_abc().await;
    app.purchase("board", c.id, "2000.00").await;
    app.wait_processed("board").await;
    let on_board = |id: i64| {
        let app = &app;
        async move {
            let (_, board) = call(app.http.get(app.url("/api/leaderboard"))).await;
            board
                .as_array()
                .expect("leaderboard")
                .iter()
                .any(|l| l["user_id"] == id)
        }
    };
    // The leaderboard is a snapshot the workers refresh (every 100 ms in the tests): a user
    // who earned, or shows itself again, is on it from the next refresh.
    let on_board_soon = |id: i64| async move {
        for _ in 0..100 {
            if on_board(id).await {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    };
    assert!(on_board_soon(a.id).await);
    let hide = |visible: Value| {
        call(
            app.http
                .patch(app.url(&format!("/api/users/{}", a.id)))
                .bearer_auth(&a.token)
                .json(&json!({ "show_on_leaderboard": visible })),
        )
    };
    let (status, user) = hide(json!(false)).await;
    assert_eq!(
        (status, user["show_on_leaderboard"].clone()),
        (200, json!(false))
    );
    assert!(!on_board(a.id).await);
    assert_eq!(
        app.earnings(a.id).await["total"],
        "20.00",
        "earnings unaffected"
    );
    let (status, body) = hide(json!("no")).await;
    assert_eq!(
        (status, body["field"].as_str()),
        (422, Some("show_on_leaderboard"))
    );
    assert_eq!(hide(json!(true)).await.0, 200);
    assert!(on_board_soon(a.id).await);
    app.stop().await;
}

#[tokio::test]
async fn raw_message_bodies_are_kept_only_for_the_retention_period() {
    let app = TestApp::spawn_with(Services::default(), |s| {
        s.privacy.raw_body_retention = Duration::from_secs(1);
    })
    .await;
    let (_, _, c) = app.chain_abc().await;
    let body = json!({"purchase_id": "with-pii", "buyer_id": c.id, "amount": "2000.00",
        "customer_phone": "+91 98765 43210"});
    app.publish_raw(body.to_string().as_bytes()).await;
    app.wait_processed("with-pii").await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let kept: Option<Value> =
            sqlx::query_scalar("select body from purchases where purchase_id = 'with-pii'")
                .fetch_one(&app.db)
                .await
                .expect("query");
        if kept.is_none() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the raw body outlived its retention"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The purchase and its commissions are untouched, and a re-send is still a duplicate.
    app.publish_raw(body.to_string().as_bytes()).await;
    app.purchase("marker", c.id, "10.00").await;
    app.wait_processed("marker").await;
    let (status, report) = app.admin_get("/api/purchases/with-pii").await;
    assert_eq!(status, 200);
    assert_eq!(report["status"], "processed", "{report}");
    assert_eq!(report["levels"][0]["amount"], "100.00");
    app.stop().await;
}

#[tokio::test]
async fn tokens_keys_and_emails_never_appear_in_the_logs_even_at_trace_level() {
    use crate::harness::{free_port, sandbox, unique};
    use futures_util::StreamExt;
    use tokio::io::AsyncReadExt;

    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    let sandbox = sandbox().await;
    let (api_port, notifier_port, worker_port) = (free_port(), free_port(), free_port());
    let secret = format!("token-secret-{}", unique("never-logged"));
    let admin = format!("admin-key-{}", unique("never-logged"));
    let producer = format!("producer-key-{}", unique("never-logged"));
    let wrong = format!("wrong-key-{}", unique("never-logged"));
    let email = format!("{}@example.com", unique("never-logged-email"));
    // A production deployment with real secrets, logging everything, as JSON.
    let mut child = Command::new(env!("CARGO_BIN_EXE_upline"))
        .arg("run")
        .env("DATABASE_URL", &sandbox.settings.database.url)
        .env("AMQP_URL", &sandbox.settings.amqp.url)
        .env("UPLINE__API__BIND", format!("127.0.0.1:{api_port}"))
        .env(
            "UPLINE__NOTIFIER__BIND",
            format!("127.0.0.1:{notifier_port}"),
        )
        .env("UPLINE__WORKER__BIND", format!("127.0.0.1:{worker_port}"))
        .env("UPLINE__APP__ENVIRONMENT", "production")
        .env("UPLINE__AUTH__TOKEN_SECRET", &secret)
        .env("UPLINE__AUTH__ADMIN_TOKEN", &admin)
        .env("UPLINE__AUTH__PRODUCER_TOKEN", &producer)
        .env("UPLINE__LOG__FORMAT", "json")
        .env("RUST_LOG", "trace")
        .current_dir(std::env::temp_dir())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the upline binary starts");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let logs = tokio::spawn(async move {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let _ = tokio::join!(stdout.read_to_end(&mut out), stderr.read_to_end(&mut err));
        out.extend(err);
        String::from_utf8_lossy(&out).into_owned()
    });
    let api = format!("http://127.0.0.1:{api_port}");
    let notifier = format!("http://127.0.0.1:{notifier_port}");
    let deadline = Instant::now() + Duration::from_secs(60);
    for base in [&api, &notifier] {
        while !matches!(http.get(format!("{base}/readyz")).send().await, Ok(r) if r.status() == 200)
        {
            assert!(Instant::now() < deadline, "{base} did not become ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // Everything that carries a credential or an email, once each.
    let (status, referrer) = call(
        http.post(format!("{api}/api/users"))
            .json(&json!({"name": "Referrer", "email": email})),
    )
    .await;
    assert_eq!(status, 201, "{referrer}");
    let referrer_token = referrer["token"].as_str().expect("token").to_owned();
    let referrer_id = referrer["id"].as_i64().expect("id");
    let (status, buyer) = call(
        http.post(format!("{api}/api/users"))
            .json(&json!({"name": "Buyer",
            "email": format!("buyer-{email}"), "referral_code": referrer["referral_code"]})),
    )
    .await;
    assert_eq!(status, 201, "{buyer}");
    let buyer_token = buyer["token"].as_str().expect("token").to_owned();
    let (status, _) = call(http.post(format!("{api}/api/users")).json(
        &json!({"name": "Again", "email": email}), // email_taken
    ))
    .await;
    assert_eq!(status, 409);
    assert_eq!(
        call(http.get(format!("{api}/api/me")).bearer_auth(&wrong))
            .await
            .0,
        403
    );
    assert_eq!(
        call(http.get(format!("{api}/api/users")).bearer_auth(&admin))
            .await
            .0,
        200
    );
    let (ws, _) = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{notifier_port}/ws"))
        .await
        .expect("websocket");
    let mut ws = crate::harness::Ws(ws);
    ws.send_subscribe(referrer_id, &referrer_token, None)
        .await
        .expect("subscribe");
    let sse = http
        .get(format!(
            "{notifier}/events/{referrer_id}?token={referrer_token}"
        ))
        .send()
        .await
        .expect("sse");
    assert_eq!(sse.status(), 200);
    let refused = http
        .get(format!("{notifier}/events/{referrer_id}?token={admin}"))
        .send()
        .await
        .expect("sse");
    assert_eq!(refused.status(), 403);
    let (status, _) = call(
        http.post(format!("{api}/api/purchases"))
            .bearer_auth(&producer)
            .json(&json!({"purchase_id": "logged", "buyer_id": buyer["id"], "amount": "2000.00"})),
    )
    .await;
    assert_eq!(status, 202);
    // The earning reaches the socket: the whole pipeline ran with logging on.
    let earning = loop {
        let frame = tokio::time::timeout(Duration::from_secs(20), ws.0.next())
            .await
            .expect("an earning within 20 s")
            .expect("open")
            .expect("frame");
        if let tokio_tungstenite::tungstenite::Message::Text(t) = frame {
            if let ServerMessage::Earning { earning } = crate::harness::server_message(&t) {
                break earning;
            }
        }
    };
    assert_eq!(earning.amount.to_string(), "100.00");
    let (status, _) = call(
        http.delete(format!("{api}/api/users/{referrer_id}/tokens"))
            .bearer_auth(&buyer_token),
    )
    .await;
    assert_eq!(status, 403);
    drop(ws);
    drop(sse);

    // Stop it gracefully and read everything it wrote.
    let pid = child.id().expect("running").to_string();
    let _ = Command::new("kill").args(["-TERM", &pid]).status().await;
    let exited = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
    assert!(
        matches!(exited, Ok(Ok(s)) if s.success()),
        "stopped gracefully: {exited:?}"
    );
    let logs = logs.await.expect("log reader");
    for (what, value) in [
        ("the token secret", secret.as_str()),
        ("the admin key", admin.as_str()),
        ("the producer key", producer.as_str()),
        ("a wrong key", wrong.as_str()),
        ("a user token", referrer_token.as_str()),
        ("a user token", buyer_token.as_str()),
        ("an email", email.as_str()),
    ] {
        if let Some(at) = logs.find(value) {
            let line_start = logs[..at].rfind('\n').map_or(0, |i| i + 1);
            let line_end = logs[at..].find('\n').map_or(logs.len(), |i| at + i);
            panic!(
                "{what} appears in the logs:\n{}",
                &logs[line_start..line_end]
            );
        }
    }
    // The check saw real, detailed logs.
    assert!(logs.contains("api listening"), "no start-up lines");
    assert!(
        logs.lines().filter(|l| l.contains("\"TRACE\"")).count() > 100,
        "too few TRACE lines: logging was not fully on"
    );

    sandbox.destroy().await.expect("drop test database");
}

/// The code of an error message; `None` for any other message.
fn error_code(message: &ServerMessage) -> Option<ErrorCode> {
    match message {
        ServerMessage::Error(e) => Some(e.code),
        _ => None,
    }
}
