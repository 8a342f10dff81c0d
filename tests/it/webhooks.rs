//! Signed webhooks (contract §11) end to end: endpoints registered over REST, the webhooks
//! service and worker running for real, and a receiver written as a user writes one
//! (`tests/browser/webhook-receiver.mjs`), which verifies every delivery with the npm
//! `standardwebhooks` library.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_util::sync::CancellationToken;

use upline_common::Settings;

use crate::harness::{browser_test_dir, free_port, Services, TestApp, ADMIN};

/// Fast retries for tests: 7 attempts within about 3 s.
const FAST_RETRIES: &str = "100ms,200ms,300ms,500ms,700ms,1s";

async fn app_with_webhooks(worker: bool, configure: impl FnOnce(&mut Settings)) -> TestApp {
    TestApp::spawn_with(
        Services {
            worker,
            ..Services::default()
        },
        |s| {
            s.webhooks.allow_private_targets = true;
            s.webhooks.retry_schedule = FAST_RETRIES.split(',').map(str::to_owned).collect();
            s.webhooks.timeout_secs = 2;
            s.webhooks.poll_ms = 50;
            configure(s);
        },
    )
    .await
}

/// POSTs to `path` with the admin key and no body; the JSON answer.
async fn admin_post(app: &TestApp, path: &str) -> Value {
    app.http
        .post(app.url(path))
        .bearer_auth(ADMIN)
        .send()
        .await
        .expect("api answers")
        .json()
        .await
        .expect("json")
}

/// Stops a service started with a stop token and requires it to stop cleanly.
async fn stop_service(
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    what: &str,
) {
    stop.cancel();
    task.await
        .expect("joined")
        .unwrap_or_else(|e| panic!("{what} did not stop cleanly: {e:#}"));
}

/// Waits (up to 60 s) until the webhooks service disabled endpoint `id`; returns it.
async fn wait_disabled(app: &TestApp, id: i64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let e = admin_get(app, &format!("/api/webhooks/{id}")).await;
        if e["enabled"] == false {
            return e;
        }
        assert!(
            Instant::now() < deadline,
            "endpoint {id} was never disabled: {e}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The node receiver on `port`, failing the first `fail_first` attempts of each message.
struct Receiver {
    base: String,
    _process: tokio::process::Child,
}

impl Receiver {
    async fn start(port: u16, fail_first: u32) -> Receiver {
        let dir = browser_test_dir().await;
        let mut process = tokio::process::Command::new("node")
            .arg(dir.join("webhook-receiver.mjs"))
            .args([port.to_string(), fail_first.to_string()])
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("node runs (Node.js 18+ is needed for the webhook tests)");
        let stdout = process.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .expect("the receiver starts within 20 s")
            .expect("reading the receiver's output")
            .expect("the receiver prints its port");
        assert_eq!(line, format!("listening {port}"));
        Receiver {
            base: format!("http://127.0.0.1:{port}"),
            _process: process,
        }
    }

    async fn set_secrets(&self, http: &reqwest::Client, secrets: &[&str]) {
        let r = http
            .put(format!("{}/secrets", self.base))
            .json(&secrets)
            .send()
            .await
            .expect("receiver answers");
        assert_eq!(r.status(), 204);
    }

    async fn state(&self, http: &reqwest::Client) -> Value {
        http.get(format!("{}/state", self.base))
            .send()
            .await
            .expect("receiver answers")
            .json()
            .await
            .expect("receiver state")
    }

    /// Waits (up to `within`) until the receiver has recorded every id of `ids`; returns its
    /// state.
    async fn wait_for(
        &self,
        http: &reqwest::Client,
        ids: &BTreeSet<String>,
        within: Duration,
    ) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let state = self.state(http).await;
            let got: BTreeSet<String> = received(&state).into_iter().map(|r| r.0).collect();
            if ids.is_subset(&got) {
                return state;
            }
            assert!(
                Instant::now() < deadline,
                "the receiver still misses {:?} after {within:?}; state: {state}",
                ids.difference(&got).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// (webhook-id, type, data) of every delivery the receiver accepted, in order.
fn received(state: &Value) -> Vec<(String, String, Value)> {
    state["received"]
        .as_array()
        .expect("received")
        .iter()
        .map(|r| {
            (
                r["id"].as_str().expect("id").to_owned(),
                r["type"].as_str().expect("type").to_owned(),
                r["data"].clone(),
            )
        })
        .collect()
}

async fn register_endpoint(app: &TestApp, url: &str, events: &[&str]) -> (i64, String) {
    let r = app
        .http
        .post(app.url("/api/webhooks"))
        .bearer_auth(ADMIN)
        .json(&json!({"url": url, "events": events, "description": "test receiver"}))
        .send()
        .await
        .expect("api answers");
    let status = r.status();
    let body: Value = r.json().await.expect("json");
    assert_eq!(status, 201, "{body}");
    let secret = body["secret"].as_str().expect("secret").to_owned();
    assert!(secret.starts_with("whsec_"), "{secret}");
    (body["id"].as_i64().expect("id"), secret)
}

async fn admin_get(app: &TestApp, path: &str) -> Value {
    let (status, body) = app.admin_get(path).await;
    assert_eq!(status, 200, "{path}: {body}");
    body
}

/// The `webhook-id`s of every earning credited so far, and of every recorded purchase.
async fn expected_ids(app: &TestApp) -> BTreeSet<String> {
    let earnings: Vec<i64> =
        sqlx::query_scalar("select id from earnings where kind = 'commission'")
            .fetch_all(&app.db)
            .await
            .expect("earnings");
    let purchases: Vec<String> = sqlx::query_scalar("select purchase_id from purchases")
        .fetch_all(&app.db)
        .await
        .expect("purchases");
    earnings
        .into_iter()
        .map(|id| format!("msg_earning_{id}"))
        .chain(purchases.into_iter().map(|p| format!("msg_purchase_{p}")))
        .collect()
}

/// A receiver that answers 500 to the first two attempts of every message gets each event
/// exactly once after de-duplication, every delivery verified by `standardwebhooks`, through a
/// restart of the webhooks service and of the worker in the middle. Then a replay sends the
/// same `webhook-id` again, and after a secret rotation deliveries verify with both secrets.
#[tokio::test]
async fn a_receiver_failing_at_first_gets_every_event_once_signed_through_restarts() {
    let app = app_with_webhooks(false, |_| {}).await;
    let port = free_port();
    let receiver = Receiver::start(port, 2).await;
    let (endpoint, secret) = register_endpoint(
        &app,
        &format!("http://127.0.0.1:{port}/hook"),
        &["earning.created", "purchase.processed", "purchase.rejected"],
    )
    .await;
    receiver.set_secrets(&app.http, &[&secret]).await;

    let worker_stop = CancellationToken::new();
    let worker = app.spawn_stoppable_worker(worker_stop.clone()).await;
    let hooks_stop = CancellationToken::new();
    let (_, hooks) = app.spawn_stoppable_webhooks(hooks_stop.clone()).await;

    let (_, _, c) = app.chain_abc().await;
    app.purchase("wh-1", c.id, "2000.00").await;
    app.wait_processed("wh-1").await;

    // The webhooks service goes down; a purchase and a rejected one arrive meanwhile.
    stop_service(hooks_stop, hooks, "webhooks service").await;
    app.purchase("wh-2", c.id, "3000.00").await;
    // The api refuses a wrong currency; a producer on the queue gets it rejected by a worker.
    let body =
        json!({"purchase_id": "wh-3", "buyer_id": c.id, "amount": "10.00", "currency": "USD"});
    app.publish_raw(body.to_string().as_bytes()).await;
    app.wait_processed("wh-2").await;
    app.wait_processed("wh-3").await;

    // The worker goes down with a purchase on the way; the webhooks service comes back first.
    stop_service(worker_stop, worker, "worker").await;
    let hooks_stop = CancellationToken::new();
    let (_, hooks) = app.spawn_stoppable_webhooks(hooks_stop.clone()).await;
    app.purchase("wh-4", c.id, "1500.00").await;
    // Not recorded within 5 s: the webhooks service parks it and acknowledges its copy.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let parked: Option<String> =
            sqlx::query_scalar("select purchase_id from webhook_purchase_waits")
                .fetch_optional(&app.db)
                .await
                .expect("parked purchases");
        if parked.as_deref() == Some("wh-4") {
            break;
        }
        assert!(Instant::now() < deadline, "wh-4 was never parked");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let worker_stop = CancellationToken::new();
    let worker = app.spawn_stoppable_worker(worker_stop.clone()).await;
    app.wait_processed("wh-4").await;

    // 3 processed purchases × 2 levels, 3 purchase.processed, 1 purchase.rejected; the parked
    // purchase is resolved once recorded.
    let deadline = Instant::now() + Duration::from_secs(30);
    while sqlx::query_scalar::<_, i64>("select count(*) from webhook_purchase_waits")
        .fetch_one(&app.db)
        .await
        .expect("parked purchases")
        > 0
    {
        assert!(Instant::now() < deadline, "wh-4 stayed parked");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ids = expected_ids(&app).await;
    assert_eq!(ids.len(), 10, "{ids:?}");
    let state = receiver
        .wait_for(&app.http, &ids, Duration::from_secs(60))
        .await;
    let got = received(&state);
    let unique: BTreeMap<&str, (&str, &Value)> = got
        .iter()
        .map(|(id, t, d)| (id.as_str(), (t.as_str(), d)))
        .collect();
    assert_eq!(
        unique.len(),
        ids.len(),
        "nothing more than expected: {got:?}"
    );
    assert_eq!(state["invalid"], 0, "every delivery verifies");
    for (id, n) in state["attempts"].as_object().expect("attempts") {
        assert!(
            n.as_u64().expect("count") >= 3,
            "{id}: two failures, then a success"
        );
    }
    let (t, data) = unique["msg_purchase_wh-3"];
    assert_eq!(t, "purchase.rejected");
    assert!(
        data["reason"]
            .as_str()
            .expect("reason")
            .contains("currency"),
        "{data}"
    );
    let (t, data) = unique["msg_purchase_wh-1"];
    assert_eq!(t, "purchase.processed");
    assert_eq!(data["amount"], "2000.00");
    assert_eq!(data["levels"][0]["outcome"], "paid");
    assert_eq!(data["levels"][0]["amount"], "100.00");
    let commission = unique
        .iter()
        .find(|(id, (t, d))| {
            id.starts_with("msg_earning_")
                && *t == "earning.created"
                && d["purchase_id"] == "wh-1"
                && d["level"] == 1
        })
        .expect("B's commission of wh-1");
    assert_eq!(commission.1 .1["amount"], "100.00");

    // The deliveries as an admin sees them: each delivered on its third attempt (successes
    // are recorded in batches, a moment after the endpoint answered).
    let deadline = Instant::now() + Duration::from_secs(10);
    let page = loop {
        let page = admin_get(
            &app,
            &format!("/api/webhooks/{endpoint}/deliveries?limit=50"),
        )
        .await;
        let items = page["items"].as_array().expect("items");
        if items.iter().all(|d| d["status"] == "delivered") || Instant::now() > deadline {
            break page;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let items = page["items"].as_array().expect("items");
    assert_eq!(items.len(), ids.len());
    for d in items {
        assert_eq!(d["status"], "delivered", "{d}");
        assert_eq!(d["attempts"], 3, "{d}");
        let log = d["attempt_log"].as_array().expect("attempt_log");
        assert_eq!(log.len(), 3);
        assert_eq!(log[0]["status_code"], 204);
        assert_eq!(log[2]["status_code"], 500);
        assert!(log[2]["error"]
            .as_str()
            .expect("body kept")
            .contains("on purpose"));
    }

    // A replay sends the same webhook-id again; rotated secrets sign it twice.
    let rotated: Value = admin_post(&app, &format!("/api/webhooks/{endpoint}/rotate-secret")).await;
    let new_secret = rotated["secret"].as_str().expect("secret");
    assert_ne!(new_secret, secret);
    receiver
        .set_secrets(&app.http, &[&secret, new_secret])
        .await;
    let replayed = &items[0];
    let r = app
        .http
        .post(app.url(&format!(
            "/api/webhooks/{endpoint}/deliveries/{}/replay",
            replayed["id"]
        )))
        .bearer_auth(ADMIN)
        .send()
        .await
        .expect("api answers");
    assert_eq!(r.status(), 202);
    let deadline = Instant::now() + Duration::from_secs(30);
    let again = loop {
        let state = receiver.state(&app.http).await;
        let rows = state["received"].as_array().expect("received").clone();
        if rows.len() > got.len() {
            break rows.last().cloned().expect("the replayed delivery");
        }
        assert!(
            Instant::now() < deadline,
            "the replay never arrived: {state}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(again["id"], replayed["message_id"]);
    assert_eq!(
        again["verified_with"],
        json!([0, 1]),
        "signed with the old and the new secret"
    );

    stop_service(hooks_stop, hooks, "webhooks service").await;
    stop_service(worker_stop, worker, "worker").await;
    app.stop().await;
}

/// A slow endpoint never holds back a healthy one, and a dead one is disabled:
/// - with 10 attempts in flight in all and 8 per endpoint, an endpoint that accepts
///   connections and never answers, with 16 deliveries due, holds only 8 attempts for the
///   whole 30 s timeout (without the cap per endpoint it would take all 10), while the healthy
///   endpoint gets every event within 20 s through the slots left;
/// - an endpoint that refuses connections fails every attempt of its first message and is
///   disabled with the reason; enabling it clears the reason.
#[tokio::test]
async fn a_hanging_endpoint_never_holds_back_a_healthy_one_and_a_dead_one_is_disabled() {
    let app = app_with_webhooks(true, |s| {
        s.webhooks.max_in_flight = 10;
        s.webhooks.max_in_flight_per_endpoint = 8;
        s.webhooks.timeout_secs = 30;
    })
    .await;
    // Accepts and holds every connection, answering nothing.
    let hanging = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let hanging_port = hanging.local_addr().expect("addr").port();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((socket, _)) = hanging.accept().await {
            open.push(socket);
        }
    });
    // Refuses connections: a port nobody listens on.
    let refused_port = free_port();
    let port = free_port();
    let receiver = Receiver::start(port, 0).await;
    let events = ["earning.created"];
    let (hanging_id, _) = register_endpoint(
        &app,
        &format!("http://127.0.0.1:{hanging_port}/hook"),
        &events,
    )
    .await;
    let (refused_id, _) = register_endpoint(
        &app,
        &format!("http://127.0.0.1:{refused_port}/hook"),
        &events,
    )
    .await;
    // One message only: its own failures must disable the endpoint.
    let (lonely_id, _) = register_endpoint(
        &app,
        &format!("http://127.0.0.1:{refused_port}/lonely"),
        &["purchase.rejected"],
    )
    .await;
    let (_, secret) =
        register_endpoint(&app, &format!("http://127.0.0.1:{port}/hook"), &events).await;
    receiver.set_secrets(&app.http, &[&secret]).await;
    let stop = CancellationToken::new();
    let (_, hooks) = app.spawn_stoppable_webhooks(stop.clone()).await;

    let (_, _, c) = app.chain_abc().await;
    for i in 0..8 {
        app.purchase(&format!("slow-{i}"), c.id, "2000.00").await;
    }
    for i in 0..8 {
        app.wait_processed(&format!("slow-{i}")).await;
    }
    let earning_ids: BTreeSet<String> = expected_ids(&app)
        .await
        .into_iter()
        .filter(|i| i.starts_with("msg_earning_"))
        .collect();
    assert_eq!(earning_ids.len(), 16);
    // Well within the hanging endpoint's 30 s timeout.
    receiver
        .wait_for(&app.http, &earning_ids, Duration::from_secs(20))
        .await;
    let hanging_deliveries =
        admin_get(&app, &format!("/api/webhooks/{hanging_id}/deliveries")).await;
    let items = hanging_deliveries["items"].as_array().expect("items");
    assert_eq!(items.len(), 16);
    assert!(items.iter().all(|d| d["status"] == "pending"), "{items:?}");
    let hanging_now = items.iter().filter(|d| d["attempts"] == 1).count();
    let waiting = items.iter().filter(|d| d["attempts"] == 0).count();
    assert_eq!(
        (hanging_now, waiting),
        (8, 8),
        "8 attempts hang, 8 wait their turn"
    );

    let endpoint = wait_disabled(&app, refused_id).await;
    let reason = endpoint["disabled_reason"].as_str().expect("a reason");
    assert!(reason.contains("failed all 7 attempts"), "{reason}");
    assert!(reason.contains("could not connect"), "{reason}");
    let failed = admin_get(
        &app,
        &format!("/api/webhooks/{refused_id}/deliveries?status=failed"),
    )
    .await;
    let failed = failed["items"].as_array().expect("items");
    assert!(!failed.is_empty());
    assert_eq!(
        failed[0]["attempt_log"]
            .as_array()
            .expect("attempt_log")
            .len(),
        7
    );
    let hanging_endpoint = admin_get(&app, &format!("/api/webhooks/{hanging_id}")).await;
    assert_eq!(
        hanging_endpoint["enabled"], true,
        "nothing of the hanging endpoint failed yet"
    );

    // A single rejected purchase, straight on the queue, for the endpoint with one message.
    let rejected =
        json!({"purchase_id": "lonely-1", "buyer_id": c.id, "amount": "10.00", "currency": "USD"});
    app.publish_raw(rejected.to_string().as_bytes()).await;
    let lonely = wait_disabled(&app, lonely_id).await;
    let reason = lonely["disabled_reason"].as_str().expect("a reason");
    assert!(reason.contains("msg_purchase_lonely-1"), "{reason}");

    let enabled: Value = admin_post(&app, &format!("/api/webhooks/{refused_id}/enable")).await;
    assert_eq!(enabled["enabled"], true);
    assert_eq!(enabled["disabled_reason"], Value::Null);

    // Closing the held connections ends the hanging attempts.
    held.abort();
    stop_service(stop, hooks, "webhooks service").await;
    app.stop().await;
}

/// Registration refuses what it must, naming the field: private targets (SSRF) with the
/// default settings, unknown event types, other schemes; and only the admin may register.
#[tokio::test]
async fn registration_refuses_private_targets_and_unknown_events() {
    let app = TestApp::spawn().await;
    let post = |body: Value, key: &'static str| {
        let (http, url) = (app.http.clone(), app.url("/api/webhooks"));
        async move {
            let r = http
                .post(url)
                .bearer_auth(key)
                .json(&body)
                .send()
                .await
                .expect("api answers");
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    for (url, says) in [
        ("http://127.0.0.1:9/hook", "not a public address"),
        ("http://localhost:9/hook", "not a public address"),
        (
            "http://169.254.169.254/latest/meta-data",
            "not a public address",
        ),
        ("http://[::1]/hook", "not a public address"),
        ("http://10.0.0.7/hook", "not a public address"),
        ("ftp://example.com/hook", "http:// or https://"),
        ("https://user:pw@example.com/hook", "credentials"),
    ] {
        let (status, body) = post(json!({"url": url, "events": ["earning.created"]}), ADMIN).await;
        assert_eq!(status, 422, "{url}: {body}");
        assert_eq!(body["field"], "url", "{url}: {body}");
        assert!(
            body["detail"].as_str().expect("detail").contains(says),
            "{url}: {body}"
        );
    }
    let (status, body) = post(
        json!({"url": "http://93.184.216.34/hook", "events": ["earning.made"]}),
        ADMIN,
    )
    .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["field"], "events");
    let (status, body) = post(
        json!({"url": "http://93.184.216.34/hook", "events": []}),
        ADMIN,
    )
    .await;
    assert_eq!((status, &body["field"]), (422, &json!("events")), "{body}");
    let (status, _) = post(
        json!({"url": "http://93.184.216.34/hook", "events": ["earning.created"]}),
        crate::harness::PRODUCER,
    )
    .await;
    assert_eq!(status, 403);
    // A public target is accepted (nothing is sent: no webhooks service runs here).
    let (status, body) = post(
        json!({"url": "http://93.184.216.34/hook", "events": ["earning.created"]}),
        ADMIN,
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let list = admin_get(&app, "/api/webhooks").await;
    assert_eq!(list["items"].as_array().expect("items").len(), 1);
    assert!(
        list["items"][0].get("secret").is_none(),
        "secrets are shown only once"
    );
    app.stop().await;
}
